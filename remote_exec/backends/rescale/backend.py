"""The ``rescale`` backend: each step of a run through Rescale's REST API (see the
package docstring for the flow).

Blocking HTTP calls run in a worker thread, so Ctrl-C and ``--timeout`` interrupt a
wait at once. The client retries 5xx/429 answers and network errors itself; one that
outlived its retries interrupts the run (``resume`` goes on). Creating and submitting
are never repeated blindly: a lost create answer is looked up by the job's name, a lost
submit answer by the job's status history.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from remote_exec import returns as return_filter
from remote_exec.backends.base import (
    Launched,
    Leftover,
    Moved,
    RemoteState,
    Run,
    WebApiBackend,
    no_leftover_listing,
    no_live_log,
)
from remote_exec.backends.rescale.api import ApiError
from remote_exec.backends.rescale.client import (
    CLUSTER_COMING,
    CLUSTER_READY,
    JOB_ENDED,
    TITLE,
    RescaleService,
    job_info,
)
from remote_exec.backends.scheduler import RUN_SCRIPT, JobInfo
from remote_exec.backoff import REMOTE_POLL
from remote_exec.entrypoint import EXIT_CODE_FILE, NO_RUN_DIR, TERMINATED
from remote_exec.errors import ConnectError, FetchError, RemoteExecError, StageError
from remote_exec.inputs import CONTROL_DIR, Input
from remote_exec.journal import RunRecord
from remote_exec.localfs import input_files
from remote_exec.site.rows import FAIL, OK, WARN, Row
from remote_exec.ui import Reporter

T = TypeVar("T")
#: the one upload of a run: its inputs and control files, names and modes kept
ARCHIVE = "remote-exec-inputs.tar.gz"
#: the job's command: unpack (unless the service did; a failure exits like a missing run
#: directory) and run the wrapper, which writes the entrypoint's exit code to
#: .remote-exec/exit_code (Rescale's statuses carry none)
COMMAND = (f"if [ -f {ARCHIVE} ]; then tar xzf {ARCHIVE} && rm -f {ARCHIVE} "
           f"|| exit {NO_RUN_DIR}; fi; /bin/sh {RUN_SCRIPT}")
EXIT_CODE = f"{CONTROL_DIR}/{EXIT_CODE_FILE}"
#: statuses of a job that was created but never submitted
UNSUBMITTED = ("Not Submitted", "Not Started")
#: how long the outputs of an ended job may stay ``isUploaded: false``
OUTPUT_WAIT = 300.0


def job_name(run_id: str) -> str:
    """The job's name on Rescale: how a lost create answer is found again."""
    return f"remote-exec-{run_id}"


def submitted(statuses: list[dict[str, Any]]) -> bool:
    return any(str(s.get("status")) not in UNSUBMITTED for s in statuses)


def describe(info: JobInfo) -> str:
    """``Rescale job QvQAo: Executing (reason); history: Pending → Queued → …``."""
    text = f"{TITLE} job {info.job_id}: {info.native}"
    if info.reason:
        text += f" ({info.reason})"
    if info.exit_code is not None:
        text += f"; exit code {info.exit_code}"
    history = info.extra.get("history")
    return f"{text}; history: {history}" if history else text


def _lost(exc: BaseException) -> bool:
    """Rescale did not answer (after the client's own retries)."""
    return isinstance(exc, ConnectError) or (isinstance(exc, ApiError) and exc.transient)


def pack(archive: Path, control: dict[str, bytes], inputs: list[Input]) -> int:
    """Write the run's control files (under ``.remote-exec/``) and inputs into one
    gzipped tar, file by file (nothing held whole in memory); the inputs' bytes."""
    size = 0
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in control.items():
            info = tarfile.TarInfo(f"{CONTROL_DIR}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o755, int(time.time())
            tar.addfile(info, _Bytes(data))
        for path, rel in input_files(inputs):
            with path.open("rb") as f:
                info = tar.gettarinfo(arcname=rel, fileobj=f)
                info.uname = info.gname = ""
                tar.addfile(info, f)
                size += info.size
    return size


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.at + n
        chunk, self.at = self.data[self.at:end], min(end, len(self.data))
        return chunk


def _safe(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and ".." not in parts and "" not in parts


class RescaleBackend(WebApiBackend):
    """One run as a Rescale job."""

    name = "rescale"
    place_noun = "Rescale job"
    answers = "Rescale"

    def __init__(self, site: Any, run_id: str = "", resources: dict[str, Any] | None = None,
                 **options: Any) -> None:
        super().__init__(site, run_id, resources, **options)
        self._pending: asyncio.Future[Any] | None = None  # a create or submit in flight
        self._ended_first = False  # the job had ended when the stop reached it
        self._stopped_by_us = False

    def make_service(self) -> RescaleService:
        return RescaleService(self.site)

    def lost(self, exc: BaseException) -> bool:
        return _lost(exc)

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    def _polls(self) -> Iterator[float]:
        return REMOTE_POLL.capped(self.service.settings.poll_max).delays()

    async def _shielded(self, call: Awaitable[T]) -> T:
        """A call that must not be lost to a Ctrl-C: a cancel waits for its answer."""
        self._pending = asyncio.ensure_future(call)
        try:
            return await asyncio.shield(self._pending)
        finally:
            if self._pending.done():
                self._pending = None

    # -- a run's steps -----------------------------------------------------------------------
    async def create(self, run: Run) -> str:
        await run.set_rundir(job_name(run.run_id))
        return f"a {TITLE} job named {run.rundir} on {self.service.settings.platform}"

    def where(self, run: Run) -> str:
        return f"{run.job_id or run.rundir} on {self.service.settings.platform}"

    async def stage(self, run: Run) -> Moved:
        size = sum(i.size for i in run.request.inputs)
        job_id = run.job_id or (await self._find(run.run_id) if run.retrying else None)
        if job_id:
            run.job_id = job_id
            await run.record(job_id=job_id)
            return Moved("Rescale files", f"before, to {TITLE} job {job_id}", size=size)
        with tempfile.TemporaryDirectory(prefix="remote-exec-rescale-") as tmp:
            archive = Path(tmp) / ARCHIVE
            await self._blocking(pack, archive, run.request.entrypoint.control_files(),
                                 run.request.inputs)
            run.ui.event("packed", f"packed the inputs into {ARCHIVE} "
                         f"({archive.stat().st_size} bytes)", bytes=archive.stat().st_size)
            uploaded = await self._blocking(self.api.upload, archive, ARCHIVE)
        job_id = await self._create(run, str(uploaded["id"]))
        run.job_id = job_id
        await run.record(job_id=job_id)
        return Moved("Rescale files", f"as {TITLE} file {uploaded['id']} of job {job_id}",
                     size=size)

    def _job_body(self, run_id: str, file_id: str) -> dict[str, Any]:
        settings = self.service.settings
        body: dict[str, Any] = {
            "name": job_name(run_id),
            "jobanalyses": [{"analysis": dict(settings.analysis), "command": COMMAND,
                             "flags": {}, "hardware": settings.hardware_body(),
                             "inputFiles": [{"id": file_id}]}],
        }
        if settings.low_priority:
            body["isLowPriority"] = True
        return body

    async def _create(self, run: Run, file_id: str) -> str:
        try:
            job = await self._shielded(self._blocking(self.api.create_job,
                                                      self._job_body(run.run_id, file_id)))
            return str(job["id"])
        except (ConnectError, ApiError):  # the service may have created it all the same
            found = await self._find(run.run_id)
            if found is None:
                raise
            run.ui.event("adopted", f"the create answer was lost; found {TITLE} job {found}")
            return found

    async def _find(self, run_id: str) -> str | None:
        """The job this run created before an answer was lost (found by its name)."""
        name = job_name(run_id)

        def look() -> str | None:
            return next((str(j["id"]) for j in self.api.jobs()
                         if j.get("name") == name and j.get("id")), None)
        return await self._blocking(look)

    async def launch(self, run: Run) -> Launched:
        job_id = run.job_id
        if not job_id:
            raise StageError(f"the run has no {TITLE} job to submit",
                             hint="start a new run")
        if run.retrying and submitted(await self._blocking(self.api.job_statuses, job_id)):
            return Launched(job_id=job_id, before=True)
        cluster = self.service.settings.cluster
        if cluster is not None:
            await self._cluster_ready(run)
            call = self._blocking(self.api.submit_to_cluster, cluster.id, job_id)
        else:
            call = self._blocking(self.api.submit, job_id)
        try:
            await self._shielded(call)
        except (ConnectError, ApiError):  # the submit may have been taken all the same
            if not submitted(await self._blocking(self.api.job_statuses, job_id)):
                raise
            run.ui.event("adopted", f"the submit answer was lost; {TITLE} job {job_id} "
                         "had been submitted")
        return Launched(job_id=job_id)

    def launch_text(self, run: Run, launched: Launched) -> str:
        again = " (it had been submitted before)" if launched.before else ""
        cluster = self.service.settings.cluster
        to = f"to cluster {cluster.id}" if cluster else "on demand"
        return f"submitted {TITLE} job {launched.job_id} {to}{again}: " \
               f"{run.request.entrypoint.label}"

    async def _cluster_ready(self, run: Run) -> None:
        """Wait until the persistent cluster is ``Started``; start it first if it is down
        and the site allows it."""
        cluster = self.service.settings.cluster
        assert cluster is not None
        deadline, started, last = time.monotonic() + cluster.start_timeout, False, ""
        for delay in self._polls():
            statuses = await self._blocking(self.api.cluster_statuses, cluster.id)
            now = str(statuses[0].get("status")) if statuses else "Not Started"
            if now != last:
                run.ui.event("cluster", f"{TITLE} cluster {cluster.id}: {now}",
                             cluster=cluster.id, status=now)
                last = now
            if now in CLUSTER_READY:
                return
            if now in ("Not Started", "Stopped") and not started:
                if not cluster.start:
                    raise StageError(f"{TITLE} cluster {cluster.id} is {now}",
                                     hint="start it, or set the site's rescale.cluster.start: "
                                     "true to let remote-exec start it")
                await self._blocking(self.api.start_cluster, cluster.id)
                started = True
            elif now not in CLUSTER_COMING and now not in ("Not Started", "Stopped",
                                                            "Stop Requested", "Stopping"):
                raise StageError(f"{TITLE} cluster {cluster.id} is {now!r}, a status the "
                                 "README does not know")
            if time.monotonic() > deadline:
                raise StageError(f"{TITLE} cluster {cluster.id} is still {now} after "
                                 f"{cluster.start_timeout:g} s",
                                 hint="raise rescale.cluster.start_timeout, or start it first")
            await asyncio.sleep(delay)

    async def wait(self, run: Run, launched: Launched | None) -> int:
        assert run.job_id is not None
        info = None
        for delay in self._polls():
            info = job_info(run.job_id, await self._blocking(self.api.job_statuses, run.job_id))
            await self._note(run, info)
            if info.native in JOB_ENDED:
                break
            await asyncio.sleep(delay)
        assert info is not None
        code = await self._exit_code(run.job_id, wait=True)
        if code is None:
            if info.native in ("Stopped", "Force Stopped"):
                code = TERMINATED
            else:
                code = 1
                run.ui.warn(f"{TITLE} job {run.job_id} ended ({info.native}) without an "
                            "exit code (its wrapper never ran, or was killed): counted as "
                            "failed (1); what it left comes back with the run's files")
        info.exit_code = code
        await self._note(run, info)
        return code

    async def cancelled_remotely(self, run: Run) -> bool:
        info = run.job_info
        return bool(info and info.native in ("Stopped", "Force Stopped")
                    and not self._stopped_by_us)

    async def _exit_code(self, job_id: str, wait: bool = False) -> int | None:
        """The wrapper's exit code, read from the job's outputs (None if it wrote none).
        With ``wait``, until the service has uploaded the job's outputs."""
        deadline = time.monotonic() + (OUTPUT_WAIT if wait else 0)
        for delay in self._polls():
            files = await self._blocking(self.api.job_files, job_id)
            entry = next((f for f in files if _rel(f) == EXIT_CODE), None)
            pending = [f for f in files if f.get("isUploaded") is False]
            if not pending or time.monotonic() > deadline:
                break
            await asyncio.sleep(delay)
        if entry is None or entry.get("isUploaded") is False:
            return None
        with tempfile.TemporaryDirectory(prefix="remote-exec-rescale-") as tmp:
            target = Path(tmp) / "exit_code"
            await self._blocking(self.api.download, str(entry["id"]), target)
            text = target.read_text("utf-8", "replace").strip()
        return int(text) if text.lstrip("-").isdigit() else None

    async def fetch(self, run: Run, partial: Path) -> Moved:
        assert run.job_id is not None
        site, returns = self.site, run.request.returns
        keep = None
        if not return_filter.is_trivial(returns, site.never_return, site.only_return):
            keep = return_filter.predicate(returns, site.never_return, site.only_return)
        service = set(self.service.settings.service_files) | {ARCHIVE}
        chosen, skipped = [], []
        for entry in await self._blocking(self.api.job_files, run.job_id):
            rel = _rel(entry)
            if rel.startswith(CONTROL_DIR + "/") or rel in service:
                continue
            if not _safe(rel):
                skipped.append(f"{rel} (a path outside the run directory)")
            elif keep is None or keep(rel):
                chosen.append((rel, entry))
        size = sum(int(e.get("decryptedSize") or 0) for _, e in chosen)
        run.fetch_total = size
        run.ui.progress_start("downloading", size)
        report = _reporter(run.ui)
        try:
            for rel, entry in chosen:
                await self._blocking(self._download, report, partial, rel, entry)
        finally:
            run.ui.progress_stop()
        return Moved("Rescale files", f"from {TITLE} job {run.job_id}'s outputs", size=size,
                     skipped=skipped)

    def _download(self, report: Callable[[str, int, int], None] | None, partial: Path,
                  rel: str, entry: dict[str, Any]) -> None:
        """One output into ``partial`` (kept if an earlier attempt brought it whole),
        checked against the service's md5."""
        target = partial / rel
        expected = int(entry.get("decryptedSize") or -1)
        if target.is_file() and target.stat().st_size == expected:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if report is not None:
                report(rel, done, max(expected, done))
        md5 = self.api.download(str(entry["id"]), part, tick)
        if entry.get("md5") and md5 != entry["md5"]:
            part.unlink(missing_ok=True)
            raise FetchError(f"{rel} arrived damaged (md5 {md5}, the service says "
                             f"{entry['md5']})", hint="`remote-exec resume` fetches it again")
        os.replace(part, target)

    async def remove(self, run: Run) -> bool:
        if not run.job_id:
            return True
        deleted = await self._blocking(self.api.delete_job, run.job_id)
        run.ui.event("removed", f"deleted {TITLE} job {run.job_id} and its files"
                     if deleted else f"{TITLE} job {run.job_id} was gone already",
                     job_id=run.job_id)
        return True

    async def stop(self, run: Run) -> str:
        if self._pending is not None:  # a create or submit in flight: its answer first
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._pending),
                                       self.service.settings.request_timeout)
        if not run.job_id and run.rundir:
            run.job_id = await self._find(run.run_id)
        if not run.job_id:
            return f"no {TITLE} job was created yet"
        return await self._stop(run.job_id)

    async def _stop(self, job_id: str) -> str:
        """Stop the job (``…/stop/``) and wait (bounded) until it no longer runs."""
        statuses = await self._blocking(self.api.job_statuses, job_id)
        if not submitted(statuses):
            return f"{TITLE} job {job_id} was never submitted (it never will be)"
        info = job_info(job_id, statuses)
        if info.native in JOB_ENDED:
            self._ended_first = True
            return f"{TITLE} job {job_id} had already ended ({info.native})"
        answer = await self._blocking(self.api.stop, job_id)
        self._stopped_by_us = True
        deadline = time.monotonic() + self.site.cancel_grace + 15
        for delay in self._polls():
            statuses = await self._blocking(self.api.job_statuses, job_id)
            info = job_info(job_id, statuses)
            if info.native in JOB_ENDED or time.monotonic() > deadline:
                break
            await asyncio.sleep(delay)
        history = info.extra.get("history", "")
        if info.native == "Completed" and "Stopping" not in history:
            self._ended_first = True
            return f"{TITLE} job {job_id} had already ended (Completed) when the stop came"
        return f"stopped {TITLE} job {job_id} (stop answered {answer}; now {info.native})"

    async def exit_before_cancel(self, run: Run, what: str) -> int | None:
        if not self._ended_first or not run.job_id:
            return None
        return await self._exit_code(run.job_id, wait=True)

    async def _note(self, run: Run, info: JobInfo) -> None:
        text = f"{TITLE} job {info.job_id}: {info.native}"
        if info.reason:
            text += f" ({info.reason})"
        await run.note_job(info, text)

    # -- commands about recorded runs --------------------------------------------------------
    def describe_job(self, info: JobInfo) -> str:
        return describe(info)

    async def probe(self, record: RunRecord) -> RemoteState:
        try:
            if not record.job_id:
                self.validate()
                return RemoteState(reachable=True, exists=True,
                                   job=f"no {TITLE} job created yet")
            statuses = await self._blocking(self.api.job_statuses, record.job_id)
        except RemoteExecError as exc:
            if getattr(exc, "status", 0) == 404:
                return RemoteState(reachable=True, exists=False,
                                   job=f"{TITLE} job {record.job_id} no longer exists "
                                   "(deleted)")
            return RemoteState(reachable=False, error=exc.message)
        info = job_info(record.job_id, statuses)
        if record.exit_code is not None:
            info.exit_code = record.exit_code
        return RemoteState(reachable=True, exists=True, alive=info.native not in JOB_ENDED,
                           job=describe(info))

    async def read_log(self, record: RunRecord, ui: Reporter, follow: bool) -> None:
        raise no_live_log(record, f"as a {TITLE} job")

    async def cancel_recorded(self, record: RunRecord) -> tuple[str, int | None]:
        job_id = record.job_id or await self._find(record.id)
        if not job_id:
            return f"no {TITLE} job of the run exists", None
        what = await self._stop(job_id)
        code = await self._exit_code(job_id, wait=True) if self._ended_first else None
        return what, code

    async def cleanup_runs(self, decide: Callable[[Leftover], bool],
                           ui: Reporter) -> list[Leftover]:
        raise no_leftover_listing(self.site, f"as {TITLE} jobs",
                                  hint="a run's job is deleted per the site's `cleanup` "
                                  "policy; delete others in Rescale's web interface")

    async def check(self) -> list[Row]:
        return await asyncio.to_thread(self._rows)

    def _rows(self) -> list[Row]:
        """The key, the API, the core type, the cluster; and where the data goes."""
        try:
            service = self.service
        except RemoteExecError as err:
            return [Row("API key", FAIL, err.message, err.hint or "")]
        settings, api = service.settings, service.api
        rows = [Row("API key", OK, "found (value not shown)")]
        try:
            next(iter(api.jobs()), None)
            rows.append(Row("API", OK, f"{settings.platform}: the key lists jobs"))
        except RemoteExecError as err:
            return [*rows, Row("API", FAIL, err.message, err.hint or "")]
        code = settings.hardware["coreType"]
        try:
            codes = {str(c.get("code")) for c in api.core_types()}
            rows.append(Row("core type", OK, f"{code} is offered") if code in codes else
                        Row("core type", FAIL, f"{code} is not among the {len(codes)} core "
                            "types offered", "set rescale.hardware.coreType to one of: "
                            + ", ".join(sorted(codes)[:20])))
        except RemoteExecError as err:
            rows.append(Row("core type", WARN, f"could not list core types: {err.message}"))
        if settings.cluster is not None:
            rows.append(self._cluster_row(settings.cluster.id, settings.cluster.start))
        rows.append(Row("data", WARN, "inputs and results pass through Rescale's cloud, a "
                        "third party", "send only what may leave (`returns`, never_return "
                        "apply to what comes back)"))
        return rows

    def _cluster_row(self, cluster_id: str, may_start: bool) -> Row:
        try:
            statuses = self.api.cluster_statuses(cluster_id)
        except RemoteExecError as err:
            return Row("cluster", FAIL, f"{cluster_id}: {err.message}",
                       "check rescale.cluster.id")
        now = str(statuses[0].get("status")) if statuses else "Not Started"
        if now in CLUSTER_READY:
            return Row("cluster", OK, f"{cluster_id}: {now}")
        if may_start or now in CLUSTER_COMING:
            return Row("cluster", OK, f"{cluster_id}: {now} (a run waits until it is Started)")
        return Row("cluster", FAIL, f"{cluster_id}: {now}",
                   "start it, or set rescale.cluster.start: true")


def _reporter(ui: Reporter) -> Callable[[str, int, int], None] | None:
    """``ui.progress_update`` callable from a worker thread (None without progress)."""
    if not ui.show_progress:
        return None
    loop = asyncio.get_running_loop()
    return lambda *args: loop.call_soon_threadsafe(ui.progress_update, *args)


def _rel(entry: dict[str, Any]) -> str:
    """An output's path in the run directory (``relativePath``, else its name)."""
    return str(entry.get("relativePath") or entry.get("name") or "")


__all__ = ["RescaleBackend", "describe", "job_name"]
