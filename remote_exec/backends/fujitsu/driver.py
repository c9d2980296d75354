"""The life of a ``fujitsu`` run: the engine's steps, carried out through the WebAPI and
the object storage instead of an SSH connection (see the package docstring).

:class:`FujitsuDriver` reuses the engine's driver (journal phases, timeout, cancel,
final state) and replaces each step. Blocking HTTP and boto3 calls run in a worker
thread, so Ctrl-C and ``--timeout`` interrupt a wait at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from remote_exec import localfs
from remote_exec import returns as return_filter
from remote_exec.backends.batch import job_name, render_job_script
from remote_exec.backends.fujitsu.api import (
    CREDENTIALS_HINT,
    ApiError,
    ResultSyncError,
    SyncError,
)
from remote_exec.backends.fujitsu.client import TITLE, FujitsuBackend, job_info
from remote_exec.backends.pjm import PjmScheduler
from remote_exec.backends.scheduler import COMPLETED, FAILED, JobInfo, Resources
from remote_exec.backoff import REMOTE_POLL
from remote_exec.engine import _Driver
from remote_exec.errors import ConnectError, LinkLostError, RemoteExecError
from remote_exec.inputs import CONTROL_DIR

T = TypeVar("T")
JOB_SCRIPT = f"{CONTROL_DIR}/job.sh"


class FujitsuDriver(_Driver):
    """One run through the Fujitsu Cloud Service HPC WebAPI."""

    backend: FujitsuBackend

    @property
    def api(self) -> Any:
        return self.backend.api

    _submitting: asyncio.Future[str] | None = None

    async def _step(self, name: str, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except (ConnectError, ApiError) as exc:
            if isinstance(exc, ApiError) and not exc.transient:
                raise
            # the job goes on at the service: the run is interrupted, not failed
            raise LinkLostError(f"{name}: {exc.message}",
                                hint=f"`remote-exec resume {self.run_id[:8]}` once the "
                                "WebAPI answers again") from None
        except (asyncio.CancelledError, RemoteExecError):
            raise
        except Exception as exc:  # noqa: BLE001 - anything else is a bug worth its words
            raise RemoteExecError(f"{name} failed: {type(exc).__name__}: {exc}") from exc

    def _polls(self) -> Iterator[float]:
        """The delays between two questions to the WebAPI (the site caps them)."""
        return REMOTE_POLL.capped(self.backend.settings.poll_max).delays()

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    # -- steps -----------------------------------------------------------------------------
    async def _create(self) -> None:
        self.rundir = self.backend.rundir
        self.journal.update(self.run_id, rundir=self.rundir)
        self._advance("created")
        self.ui.event("created", f"run {self.run_id} on {self.site.name}: bucket "
                      f"{self.backend.settings.bucket}/{self.run_id}/ → HPC {self.rundir}",
                      run_id=self.run_id, rundir=self.rundir, site=self.site.name)

    async def _stage(self) -> None:
        bucket = self.backend.bucket
        files = dict(self.request.entrypoint.control_files())
        files["job.sh"] = render_job_script(
            "fujitsu.sh.j2", self.run_id, Resources(**self.request.resources),
            run_path=self.rundir).encode()
        for name, data in files.items():
            await self._blocking(bucket.put, f"{CONTROL_DIR}/{name}", data)
        inputs = self.request.inputs
        size = sum(i.size for i in inputs)
        self.ui.progress_start("uploading", size)
        try:
            await self._blocking(bucket.upload_inputs, inputs, self._progress())
        finally:
            self.ui.progress_stop()
        await self._sync("from_online")
        self.result.stage_method = "object storage"
        self._advance("staged")
        self.ui.event("staged", f"staged {len(inputs)} input(s), {size} bytes, through the "
                      f"bucket and a sync to {self.backend.settings.hpc_dir}",
                      inputs=[i.name for i in inputs], bytes=size, method="object storage")

    async def _launch(self) -> None:
        job_id = await self._adopt() if self.retrying else None
        before = job_id is not None
        if job_id is None:
            # shielded: a Ctrl-C meanwhile waits for the answer, to cancel that very job
            self._submitting = asyncio.ensure_future(
                self._blocking(self.api.submit, f"{self.rundir}/{JOB_SCRIPT}"))
            try:
                job_id = await asyncio.shield(self._submitting)
            except (ConnectError, ApiError):  # the service may have taken it all the same
                job_id = await self._adopt()
                if job_id is None:
                    raise
        self.job_id = job_id
        self._advance("launched", job_id=job_id)
        again = " (it had been submitted before)" if before else ""
        self.ui.event("launched", f"submitted {TITLE} job {job_id}{again}: "
                      f"{self.request.entrypoint.label} "
                      f"({Resources(**self.request.resources).describe()})",
                      run_id=self.run_id, job_id=job_id)

    async def _adopt(self) -> str | None:
        """A job this run submitted before a crash (found by its name), if still active."""
        name = job_name(self.run_id)
        for job in await self._blocking(self.api.jobs):
            if str(job.get("job_name")) == name:
                return str(job.get("job_id"))
        return None

    async def _wait(self) -> None:
        assert self.job_id is not None
        for delay in self._polls():
            detail = await self._blocking(self.api.job, self.job_id)
            if detail is None:  # 404: ended, or a detail answer racing the submission
                listed = [j for j in await self._blocking(self.api.jobs)
                          if str(j.get("job_id")) == self.job_id]
                detail = listed[0] if listed else None
                if detail is None:
                    break
            info = job_info({**detail, "job_id": self.job_id})
            self._note(info)
            if info.terminal:  # e.g. ERR: it will not run
                break
            await asyncio.sleep(delay)
        await self._sync("to_online")
        raw = await self._blocking(self.backend.bucket.read, f"{CONTROL_DIR}/exit_code")
        text = (raw or b"").decode("utf-8", "replace").strip()
        if text.lstrip("-").isdigit():
            code = int(text)
        else:  # killed before its wrapper could write one: still bring back what it left
            code = 1
            self.ui.warn(f"{TITLE} job {self.job_id} ended without an exit code (killed, "
                         "or its wrapper never ran): counted as failed (1); its .out/.err "
                         "files come back with the run's files")
        last = self.job_info
        self._note(JobInfo(job_id=self.job_id, native="EXT",
                           state=COMPLETED if code == 0 else FAILED, exit_code=code,
                           submitted=last.submitted if last else None,
                           started=last.started if last else None, ended=None,
                           time_limit=last.time_limit if last else "",
                           extra=last.extra if last else {}))
        self.exit_code = code
        self._advance("finished", exit_code=code)
        self.ui.event("finished", f"entrypoint exited with {code}",
                      run_id=self.run_id, exit_code=code)

    async def _fetch(self) -> None:
        partial = localfs.partial_dir(self.request.into, self.run_id)
        site, returns = self.site, self.request.returns
        keep = None
        if not return_filter.is_trivial(returns, site.never_return, site.only_return):
            keep = return_filter.predicate(returns, site.never_return, site.only_return)
        bucket = self.backend.bucket
        size = sum(s for rel, s in await self._blocking(lambda: list(bucket.objects()))
                   if not rel.startswith(CONTROL_DIR + "/"))
        self.ui.progress_start("downloading", size)
        try:
            skipped = await self._blocking(bucket.download, partial, keep, self._progress())
        finally:
            self.ui.progress_stop()
        placed = localfs.place(partial, self.request.into, inputs=self.request.inputs,
                               warn=self.ui.warn)
        for item in skipped:
            self.ui.warn(f"not fetched: {item}")
        self.result.fetched, self.result.fetch_method = placed, "object storage"
        self.result.skipped = skipped
        self._advance("fetched")
        self.ui.event("fetched", f"fetched {len(placed)} item(s), {size} bytes, from the "
                      f"bucket into {self.request.into}", fetched=placed, bytes=size,
                      method="object storage")

    async def _cleanup(self) -> None:
        policy = self.site.cleanup
        remove = (policy == "always") or (policy == "on-success" and self.exit_code == 0)
        if self.request.keep or not remove:
            why = "--keep" if self.request.keep else (
                "the entrypoint failed" if self.exit_code else policy)
            self.ui.event("kept", f"the run's objects are kept ({why}): "
                          f"{self.backend.settings.bucket}/{self.run_id}/", rundir=self.rundir)
        else:
            count = await self._blocking(self.backend.bucket.remove)
            self.result.remote_kept = False
            self.ui.event("cleaned", f"removed {count} object(s) of the run from the bucket "
                          f"(the HPC side keeps {self.rundir})", rundir=self.rundir)
        self._advance("cleaned")

    async def _cancelled_remotely(self) -> bool:
        return False

    async def _stop_remote(self) -> str:
        if not self.job_id and self._submitting is not None:
            with contextlib.suppress(Exception):
                self.job_id = await asyncio.wait_for(asyncio.shield(self._submitting),
                                                     self.backend.settings.request_timeout)
        if not self.job_id:
            self.job_id = await self._adopt()
        if not self.job_id:
            return "the job was not submitted yet"
        cancelled = await asyncio.wait_for(self._blocking(self.api.cancel, self.job_id),
                                           self.site.connect_timeout + 30)
        return (f"Cancel a Job {self.job_id}: cancelled" if cancelled
                else f"Cancel a Job {self.job_id}: it had already ended (404)")

    # -- helpers -----------------------------------------------------------------------------
    async def _sync(self, direction: str) -> None:
        """Start a sync of ``hpc_dir`` and wait until it completes (§6.2, §6.6). A failed
        ``to_online`` sync (after the job ran) interrupts the run: ``resume`` syncs again."""
        settings = self.backend.settings
        failed = SyncError if direction == "from_online" else ResultSyncError
        later = "" if failed is SyncError else \
            f"; then `remote-exec resume {self.run_id[:8]}` brings the results back"
        requestid = await self._blocking(self.api.start_sync, settings.hpc_dir, direction)
        self.ui.event("sync", f"sync {direction} of {settings.hpc_dir}: request {requestid}",
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

    def _note(self, info: JobInfo) -> None:
        last, self.job_info = self.job_info, info
        self.journal.update(self.run_id, job_info=json.dumps(info.to_dict()))
        if last is None or (last.native, last.reason) != (info.native, info.reason):
            why = PjmScheduler().explain(info)
            if why:
                self.ui.warn(f"{TITLE} job {info.job_id}: {info.native}: {why}; "
                             f"`remote-exec cancel {self.run_id[:8]}` gives up")
            elapse = info.extra.get("elapse_time")
            text = f"{TITLE} job {info.job_id}: {info.native}"
            if info.reason:
                text += f" ({info.reason})"
            if elapse and elapse != "-":
                text += f", elapse {elapse}"
            self.ui.event("job", text, job_id=info.job_id, state=info.state,
                          native=info.native, reason=info.reason)

    def _progress(self) -> Callable[[str, int, int], None] | None:
        if not self.ui.show_progress:
            return None
        loop = asyncio.get_running_loop()
        ui = self.ui

        def report(name: str, done: int, total: int) -> None:
            loop.call_soon_threadsafe(ui.progress_update, name, done, total)
        return report


