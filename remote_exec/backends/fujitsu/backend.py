"""The ``fujitsu`` backend: each step of a run through the Fujitsu Cloud Service HPC
WebAPI and its object storage instead of an SSH connection (see the package docstring).

Blocking HTTP and boto3 calls run in a worker thread, so Ctrl-C and ``--timeout``
interrupt a wait at once. The API client retries 5xx answers and network errors
itself; one that outlived its retries interrupts the run (``resume`` goes on, and
never submits a second job: a lost submit answer is looked up by the job's name).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
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
from remote_exec.backends.batch import describe_job, job_name, render_job_script
from remote_exec.backends.fujitsu.api import (
    CREDENTIALS_HINT,
    ApiError,
    ResultSyncError,
    SyncError,
)
from remote_exec.backends.fujitsu.client import TITLE, FujitsuService, job_info
from remote_exec.backends.pjm import PjmScheduler
from remote_exec.backends.scheduler import COMPLETED, FAILED, JobInfo, Resources
from remote_exec.backoff import REMOTE_POLL
from remote_exec.errors import ConnectError, RemoteExecError
from remote_exec.inputs import CONTROL_DIR
from remote_exec.journal import RunRecord
from remote_exec.site.rows import FAIL, OK, Row
from remote_exec.ui import Reporter

T = TypeVar("T")
JOB_SCRIPT = f"{CONTROL_DIR}/job.sh"


def describe(info: JobInfo) -> str:
    """``Fujitsu HPC job 12: RUN; queued 1 s, running 5 s`` (PJM's states and reasons)."""
    return describe_job(PjmScheduler(), info).replace("PJM job", f"{TITLE} job", 1)


def _lost(exc: BaseException) -> bool:
    """The WebAPI did not answer (after the client's own retries)."""
    return isinstance(exc, ConnectError) or (isinstance(exc, ApiError) and exc.transient)


class FujitsuBackend(WebApiBackend):
    """One run through the Fujitsu Cloud Service HPC WebAPI."""

    name = "fujitsu"
    place_noun = "bucket prefix"
    answers = "the WebAPI"

    def __init__(self, site: Any, run_id: str = "", resources: dict[str, Any] | None = None,
                 **options: Any) -> None:
        super().__init__(site, run_id, resources, **options)
        self._submitting: asyncio.Future[str] | None = None

    def make_service(self) -> FujitsuService:
        return FujitsuService(self.site, self.run_id)

    def lost(self, exc: BaseException) -> bool:
        return _lost(exc)

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread; boto3's errors in our words."""
        try:
            return await asyncio.to_thread(fn, *args)
        except (RemoteExecError, OSError):
            raise
        except Exception as exc:  # noqa: BLE001 - boto3 raises many kinds
            raise RemoteExecError(f"{type(exc).__name__}: {exc}") from exc

    def _polls(self) -> Iterator[float]:
        """The delays between two questions to the WebAPI (the site caps them)."""
        return REMOTE_POLL.capped(self.service.settings.poll_max).delays()

    # -- a run's steps -----------------------------------------------------------------------
    async def create(self, run: Run) -> str:
        await run.set_rundir(self.service.rundir)
        return f"bucket {self.service.settings.bucket}/{run.run_id}/ → HPC {run.rundir}"

    def where(self, run: Run) -> str:
        return f"{self.service.settings.bucket}/{run.run_id}/"

    async def stage(self, run: Run) -> Moved:
        bucket = self.service.bucket
        files = dict(run.request.entrypoint.control_files())
        files["job.sh"] = render_job_script(
            "fujitsu.sh.j2", run.run_id, Resources(**self.resources),
            run_path=run.rundir).encode()
        for name, data in files.items():
            await self._blocking(bucket.put, f"{CONTROL_DIR}/{name}", data)
        inputs = run.request.inputs
        size = sum(i.size for i in inputs)
        run.ui.progress_start("uploading", size)
        try:
            await self._blocking(bucket.upload_inputs, inputs, self._progress(run.ui))
        finally:
            run.ui.progress_stop()
        await self._sync(run, "from_online")
        return Moved("object storage", "through the bucket and a sync to "
                     f"{self.service.settings.hpc_dir}", size=size)

    async def launch(self, run: Run) -> Launched:
        job_id = await self._adopt(run.run_id) if run.retrying else None
        before = job_id is not None
        if job_id is None:
            # shielded: a Ctrl-C meanwhile waits for the answer, to cancel that very job
            self._submitting = asyncio.ensure_future(
                self._blocking(self.api.submit, f"{run.rundir}/{JOB_SCRIPT}"))
            try:
                job_id = await asyncio.shield(self._submitting)
            except (ConnectError, ApiError):  # the service may have taken it all the same
                job_id = await self._adopt(run.run_id)
                if job_id is None:
                    raise
        return Launched(job_id=job_id, before=before)

    def launch_text(self, run: Run, launched: Launched) -> str:
        again = " (it had been submitted before)" if launched.before else ""
        return (f"submitted {TITLE} job {launched.job_id}{again}: "
                f"{run.request.entrypoint.label} ({Resources(**self.resources).describe()})")

    async def _adopt(self, run_id: str) -> str | None:
        """A job this run submitted before a crash (found by its name), if still active."""
        name = job_name(run_id)
        for job in await self._blocking(self.api.jobs):
            if str(job.get("job_name")) == name:
                return str(job.get("job_id"))
        return None

    async def wait(self, run: Run, launched: Launched | None) -> int:
        assert run.job_id is not None
        for delay in self._polls():
            detail = await self._blocking(self.api.job, run.job_id)
            if detail is None:  # 404: ended, or a detail answer racing the submission
                listed = [j for j in await self._blocking(self.api.jobs)
                          if str(j.get("job_id")) == run.job_id]
                detail = listed[0] if listed else None
                if detail is None:
                    break
            info = job_info({**detail, "job_id": run.job_id})
            await self._note(run, info)
            if info.terminal:  # e.g. ERR: it will not run
                break
            await asyncio.sleep(delay)
        await self._sync(run, "to_online")
        raw = await self._blocking(self.service.bucket.read, f"{CONTROL_DIR}/exit_code")
        text = (raw or b"").decode("utf-8", "replace").strip()
        if text.lstrip("-").isdigit():
            code = int(text)
        else:  # killed before its wrapper could write one: still bring back what it left
            code = 1
            run.ui.warn(f"{TITLE} job {run.job_id} ended without an exit code (killed, "
                        "or its wrapper never ran): counted as failed (1); its .out/.err "
                        "files come back with the run's files")
        last = run.job_info
        await self._note(run, JobInfo(
            job_id=run.job_id, native="EXT", state=COMPLETED if code == 0 else FAILED,
            exit_code=code, submitted=last.submitted if last else None,
            started=last.started if last else None, ended=None,
            time_limit=last.time_limit if last else "", extra=last.extra if last else {}))
        return code

    async def fetch(self, run: Run, partial: Path) -> Moved:
        site, returns = self.site, run.request.returns
        keep = None
        if not return_filter.is_trivial(returns, site.never_return, site.only_return):
            keep = return_filter.predicate(returns, site.never_return, site.only_return)
        bucket = self.service.bucket
        size = sum(s for rel, s in await self._blocking(lambda: list(bucket.objects()))
                   if not rel.startswith(CONTROL_DIR + "/"))
        run.fetch_total = size
        run.ui.progress_start("downloading", size)
        try:
            skipped = await self._blocking(bucket.download, partial, keep,
                                           self._progress(run.ui))
        finally:
            run.ui.progress_stop()
        return Moved("object storage", "from the bucket", size=size, skipped=list(skipped))

    async def remove(self, run: Run) -> bool:
        count = await self._blocking(self.service.bucket.remove)
        run.ui.event("removed", f"removed {count} object(s) of the run from the bucket "
                     f"(the HPC side keeps {run.rundir})", objects=count)
        return True

    async def stop(self, run: Run) -> str:
        if not run.job_id and self._submitting is not None:
            with contextlib.suppress(Exception):
                run.job_id = await asyncio.wait_for(asyncio.shield(self._submitting),
                                                    self.service.settings.request_timeout)
        if not run.job_id:
            run.job_id = await self._adopt(run.run_id)
        if not run.job_id:
            return "the job was not submitted yet"
        return await self._cancel(run.job_id)

    async def _cancel(self, job_id: str) -> str:
        cancelled = await asyncio.wait_for(self._blocking(self.api.cancel, job_id),
                                           self.site.connect_timeout + 30)
        return (f"Cancel a Job {job_id}: cancelled" if cancelled
                else f"Cancel a Job {job_id}: it had already ended (404)")

    # -- helpers -----------------------------------------------------------------------------
    async def _sync(self, run: Run, direction: str) -> None:
        """Start a sync of ``hpc_dir`` and wait until it completes (§6.2, §6.6). A failed
        ``to_online`` sync (after the job ran) interrupts the run: ``resume`` syncs again."""
        settings = self.service.settings
        failed = SyncError if direction == "from_online" else ResultSyncError
        later = "" if failed is SyncError else \
            f"; then `remote-exec resume {run.run_id[:8]}` brings the results back"
        requestid = await self._blocking(self.api.start_sync, settings.hpc_dir, direction)
        run.ui.event("sync", f"sync {direction} of {settings.hpc_dir}: request {requestid}",
                     requestid=requestid, direction=direction)
        for delay in self._polls():
            answer = await self._blocking(self.api.sync_status, requestid)
            status = str(answer.get("status", ""))
            if status == "complete":
                result = str(answer.get("result", ""))
                if result == "0":
                    return
                raise failed(f"the sync {direction} (request {requestid}) completed with "
                             f"result {result!r}", hint=CREDENTIALS_HINT + later)
            if status.startswith("error"):
                raise failed(f"the sync {direction} (request {requestid}) failed: "
                             f"{status.partition(':')[2].strip() or status}",
                             hint=later[2:] or None)
            if status != "waiting":
                raise failed(f"the sync {direction} (request {requestid}) answered an "
                             f"unknown status {status!r}", hint=later[2:] or None)
            await asyncio.sleep(delay)

    async def _note(self, run: Run, info: JobInfo) -> None:
        text = f"{TITLE} job {info.job_id}: {info.native}"
        if info.reason:
            text += f" ({info.reason})"
        elapse = info.extra.get("elapse_time")
        if elapse and elapse != "-":
            text += f", elapse {elapse}"
        why = PjmScheduler().explain(info)
        await run.note_job(info, f"{text}: {why}" if why else text, why)

    @staticmethod
    def _progress(ui: Reporter) -> Callable[[str, int, int], None] | None:
        if not ui.show_progress:
            return None
        loop = asyncio.get_running_loop()

        def report(name: str, done: int, total: int) -> None:
            loop.call_soon_threadsafe(ui.progress_update, name, done, total)
        return report

    # -- commands about recorded runs --------------------------------------------------------
    def describe_job(self, info: JobInfo) -> str:
        text = describe(info)
        fields = " ".join(f"{k}={v}" for k, v in sorted(info.extra.items()))
        return f"{text}\n          {fields}" if fields else text

    async def probe(self, record: RunRecord) -> RemoteState:
        return await asyncio.to_thread(self._probe, record)

    def _probe(self, record: RunRecord) -> RemoteState:
        try:
            if not record.job_id:
                self.validate()
                return RemoteState(reachable=True, exists=True,
                                   job=f"no {TITLE} job submitted yet")
            detail = self.api.job(record.job_id)
        except RemoteExecError as exc:
            return RemoteState(reachable=False, error=exc.message)
        if detail is None:
            return RemoteState(reachable=True, exists=True,
                               job=f"{TITLE} job {record.job_id}: no longer queued or running")
        info = job_info({**detail, "job_id": record.job_id})
        return RemoteState(reachable=True, exists=True, alive=True,
                           job=describe(info))

    async def read_log(self, record: RunRecord, ui: Reporter, follow: bool) -> None:
        raise no_live_log(record, "through the Fujitsu HPC WebAPI")

    async def cancel_recorded(self, record: RunRecord) -> tuple[str, int | None]:
        job_id = record.job_id or await self._adopt(record.id)  # (a submission may have
        if not job_id:                                           # landed before a crash)
            return "no job of the run is queued or running", None
        return await self._cancel(job_id), None

    async def cleanup_runs(self, decide: Callable[[Leftover], bool],
                           ui: Reporter) -> list[Leftover]:
        raise no_leftover_listing(self.site, "through the Fujitsu HPC WebAPI",
                                  hint="a run's objects are removed from the bucket per the "
                                  "site's `cleanup` policy; remove others with the bucket's "
                                  "own tools")

    async def check(self) -> list[Row]:
        return await asyncio.to_thread(self._rows)

    def _rows(self) -> list[Row]:
        """The settings and credentials, the API, the bucket."""
        try:
            service = self.service
        except RemoteExecError as err:
            return [Row("credentials", FAIL, err.message, err.hint or "")]
        rows = [Row("credentials", OK, f"{service.settings.auth} (values not shown)")]
        try:
            jobs = service.api.jobs()
            rows.append(Row("WebAPI", OK, f"{service.settings.api_url}: Get Job List "
                            f"answered ({len(jobs)} queued or running)"))
        except RemoteExecError as err:
            rows.append(Row("WebAPI", FAIL, err.message, err.hint or ""))
        try:
            next(iter(service.bucket.objects()), None)
            rows.append(Row("bucket", OK, f"{service.settings.bucket} readable"))
        except Exception as exc:  # noqa: BLE001 - boto3 raises many kinds
            rows.append(Row("bucket", FAIL, f"{service.settings.bucket}: {exc}".splitlines()[0],
                            "check bucket, s3_endpoint, region and the object storage "
                            "credentials (AWS_* or s3_profile)"))
        return rows


__all__ = ["FujitsuBackend", "describe"]
