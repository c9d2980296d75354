"""The ``pull`` backend: the run becomes a job on the queue server, which a poller of
the site takes over outbound HTTPS (``docs/pull-protocol.md``).

The engine's phases map onto the server's run as follows:

  ``create``  ``POST /runs`` (the inputs' names, sizes and sha256; the same body again
              is a no-op, so a resumed run creates nothing twice);
  ``stage``   ``PUT`` each input the server does not hold yet (streamed, sha256 checked);
  ``launch``  ``POST …/submit``, then long-poll until a poller of the site took the run
              and its entrypoint is starting (the site may refuse it first: 77; nobody
              may take it within ``queue_timeout``: 69);
  ``wait``    long-poll until the poller reports the end (the entrypoint's exit code);
  ``fetch``   ``GET`` each output the site sent (sha256 checked; the return filter
              applied again here);
  ``remove``  ``DELETE /runs/ID`` (the server's spool of the run).

The site's allowlist decides on the site: this side only names the approved entrypoint
and its raw parameters (like a restricted site's agent).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from remote_exec import returns as return_filter
from remote_exec.backends.base import (
    Backend,
    Launched,
    Leftover,
    Moved,
    NoSession,
    RemoteState,
    Run,
)
from remote_exec.backends.scheduler import (
    CANCELLED,
    COMPLETED,
    FAILED,
    QUEUED,
    RUNNING,
    JobInfo,
)
from remote_exec.backoff import POLL
from remote_exec.errors import (
    EXIT_SIGNAL_BASE,
    AuthError,
    ConfigError,
    ConnectError,
    InputError,
    RemoteExecError,
    StageError,
)
from remote_exec.journal import RunRecord
from remote_exec.localfs import input_files
from remote_exec.site.rows import FAIL, OK, WARN, Row
from remote_exec.sizes import duration_text
from remote_exec.ui import Reporter

#: the server's states once the site started (or is starting) the entrypoint
STARTED = ("launching", "running", "uploading")
TERMINAL = ("finished", "expired", "cancelled")
#: the states a poller moves through while getting a run ready: recorded, not shown
QUIET = ("claimed", "staging", "staged", "launching")
#: the exit code a cancelled run ends with (as a TERM-ed process)
TERMINATED = EXIT_SIGNAL_BASE + 15
#: the server's states in the common words of ``status``
COMMON = {"created": QUEUED, "queued": QUEUED, "claimed": QUEUED, "staging": QUEUED,
          "staged": QUEUED, "launching": RUNNING, "running": RUNNING, "uploading": RUNNING,
          "expired": FAILED, "cancelled": CANCELLED}


class SiteRefused(AuthError):
    """The site's poller refused the run: its allowlist decided (final, 77)."""


class NotClaimed(ConnectError):
    """No poller of the site took the run within ``queue_timeout`` (final, 69)."""


def _ago(stamp: str | None) -> str:
    """``3 min ago`` for an RFC 3339 time, ``never`` for None."""
    if not stamp:
        return "never"
    try:
        then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    seconds = max((datetime.now(timezone.utc) - then).total_seconds(), 0.0)
    text = f"{duration_text(seconds)} ago"
    return text if seconds < 7200 else f"{text} ({stamp})"


def _where_lost(exc: BaseException) -> bool:
    from remote_exec.backends.pull.client import QueueUnreachable

    return isinstance(exc, QueueUnreachable)


class PullSession(NoSession):
    """A run's session: the client's own retries; a server that stays away interrupts."""

    def __init__(self, client: Any, hint: str) -> None:
        super().__init__(_where_lost, hint)
        self.client = client

    async def close(self) -> None:
        await self.client.close()


class PullBackend(Backend):
    """One run through a queue server and the site's poller."""

    name = "pull"
    place_noun = "queued job"

    def __init__(self, site: Any, run_id: str = "", resources: dict[str, Any] | None = None,
                 **options: Any) -> None:
        super().__init__(site, run_id, resources, **options)
        self._settings: Any = None
        self._client: Any = None
        self._missing: list[str] | None = None
        self._version = 0
        self._stall_said = False

    # -- settings and the client ---------------------------------------------------------------
    @property
    def settings(self) -> Any:
        if self._settings is None:
            from remote_exec.backends.pull.settings import PullSettings

            self._settings = PullSettings.from_site(self.site.settings.get("pull"),
                                                    f"site {self.site.name!r}")
        return self._settings

    @property
    def client(self) -> Any:
        if self._client is None:
            from remote_exec.backends.pull.client import QueueClient

            self._client = QueueClient(self.settings, self.site.name, self.site.retry_tries,
                                       self.site.retry_max_interval)
        return self._client

    def validate(self) -> None:
        self.settings.token()  # noqa: B018 - readable, private: before a record is made

    async def open(self, ui: Reporter, **how: Any) -> PullSession:
        return PullSession(self.client, f"`remote-exec resume {self.run_id[:8]}` once the "
                           f"queue server {self.settings.server} answers again")

    @contextlib.asynccontextmanager
    async def _connected(self) -> AsyncIterator[Any]:
        """The client, for a command about a recorded run (closed after it)."""
        try:
            yield self.client
        finally:
            await self.client.close()

    def where(self, run: Run) -> str:
        return f"{self.settings.server}/runs/{run.run_id}"

    # -- a run's steps -------------------------------------------------------------------------
    async def create(self, run: Run) -> str:
        await run.set_rundir(self.where(run))  # (what `status` shows as the run's place)
        await self._create(run)
        return (f"job {run.run_id} on the queue server {self.settings.server}, for a poller "
                f"of site {self.site.name}")

    async def _create(self, run: Run) -> None:
        """``POST /runs`` (again after a crash: the same body answers what is missing)."""
        from remote_exec.backends.pull.client import QueueAnswer

        self._files = await asyncio.to_thread(_describe_inputs, run)
        entry = run.request.entrypoint
        body = {"id": run.run_id, "site": self.site.name, "entrypoint": entry.text,
                "params": entry.params, "returns": list(run.request.returns),
                "inputs": [{k: v for k, v in f.items() if k != "source"}
                           for f in self._files.values()],
                "queue_timeout": self.settings.queue_timeout}
        try:
            answer = (await self.client.call("POST", "/runs", json=body))[1]
        except QueueAnswer as err:
            if err.status == 409 and err.code == "conflict":
                raise InputError(f"the inputs of run {run.run_id} changed since it was "
                                 "created on the queue server", hint="start a new run") \
                    from None
            if err.status == 400:
                raise ConfigError(err.message, hint="the queue server's `sites:` list "
                                  "names what it accepts for this site") from None
            raise
        self._missing = list(answer.get("missing") or [])

    async def stage(self, run: Run) -> Moved:
        if self._missing is None:  # resumed after `created`
            await self._create(run)
        assert self._missing is not None
        missing = [self._files[path] for path in self._missing]
        total = sum(f["size"] for f in self._files.values())
        sending = sum(f["size"] for f in missing)
        run.ui.progress_start("uploading", sending)
        done = 0
        try:
            for item in missing:
                def tick(n: int, name: str = item["path"]) -> None:
                    nonlocal done
                    done += n
                    run.ui.progress_update(name, done, sending)
                await self.client.put_file(f"/runs/{run.run_id}/inputs/{_quote(item['path'])}",
                                           item["source"], item["size"], item["sha256"], tick)
        finally:
            run.ui.progress_stop()
        self._missing = []
        return Moved("https", "to the queue server", size=total, cached=total - sending)

    async def launch(self, run: Run) -> Launched:
        answer = (await self.client.call("POST", f"/runs/{run.run_id}/submit", json={}))[1]
        self._version = 0
        before = run.retrying and answer.get("state") not in ("queued", None)
        state = await self._watch(run, until=STARTED + TERMINAL, launching=True)
        if state["state"] == "finished" and state.get("outcome") == "rejected":
            raise self._refusal(state)
        if state["state"] == "expired":
            raise self._unclaimed(state)
        # (cancelled meanwhile, by `remote-exec cancel`: `wait` ends it as a cancelled run)
        return Launched(job_id=run.run_id, before=before)

    def launch_text(self, run: Run, launched: Launched) -> str:
        poller = (run.job_info.extra.get("poller") if run.job_info else "") or "a poller"
        again = " (it had been started before)" if launched.before else ""
        return f"running {run.request.entrypoint.label} on {poller}{again}"

    async def wait(self, run: Run, launched: Launched | None) -> int:
        state = await self._watch(run, until=TERMINAL)
        return self._exit_code(run, state)

    def _exit_code(self, run: Run, state: dict[str, Any]) -> int:
        if state["state"] == "cancelled":
            return TERMINATED
        if state["state"] == "expired":
            raise self._unclaimed(state)
        outcome = state.get("outcome")
        if outcome == "rejected":
            raise self._refusal(state)
        if outcome == "exited" and state.get("exit_code") is not None:
            return int(state["exit_code"])
        if outcome == "signaled" and state.get("signal") is not None:
            return EXIT_SIGNAL_BASE + int(state["signal"])
        if outcome == "cancelled":
            return TERMINATED
        if outcome == "failed_to_start":
            raise StageError(f"the site could not start the entrypoint: "
                             f"{state.get('message') or state.get('reason')}",
                             hint="the site's poller log says more; ask its administrator")
        run.ui.warn(f"the site lost the entrypoint of run {run.run_id} "
                    f"({state.get('reason') or outcome}): {state.get('message') or ''}; "
                    "counted as failed (1); what it sent back still comes back")
        return 1

    async def cancelled_remotely(self, run: Run) -> bool:
        if run.exit_code != TERMINATED:
            return False
        state = await self._get(run.run_id)
        return state["state"] == "cancelled" or state.get("outcome") == "cancelled"

    async def follow_log(self, run: Run, stop: asyncio.Event) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        offset = 0
        delays = POLL.capped(2.0).delays()
        try:
            while True:
                data, final = await self._log(run.run_id, offset)
                offset += len(data)
                if data:
                    run.ui.log_text(decoder.decode(data))
                    await run.ui.drain()
                    delays = POLL.capped(2.0).delays()
                if final or (stop.is_set() and not data):
                    return
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), next(delays))
        finally:
            run.ui.log_text(decoder.decode(b"", True))

    async def fetch(self, run: Run, partial: Path) -> Moved:
        state = await self._get(run.run_id)
        site, returns = self.site, run.request.returns
        keep = return_filter.predicate(returns, site.never_return, site.only_return)
        outputs = [o for o in state.get("outputs") or [] if _safe(o["path"])]
        wanted = [o for o in outputs if keep(o["path"])]
        skipped = [f"{o['path']} (this side's return filter)" for o in outputs
                   if not keep(o["path"])]
        skipped += [f"{p} (kept on the site by its return filter)"
                    for p in state.get("held_back") or []]
        total = sum(int(o["size"]) for o in wanted)
        run.fetch_total = total
        run.ui.progress_start("downloading", total)
        done = 0
        try:
            for item in wanted:
                target = partial.joinpath(*item["path"].split("/"))
                if await asyncio.to_thread(_holds, target, item):
                    done += int(item["size"])
                    continue
                await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)

                def tick(n: int, name: str = item["path"]) -> None:
                    nonlocal done
                    done += n
                    run.ui.progress_update(name, done, total)
                await self.client.get_file(
                    f"/runs/{run.run_id}/outputs/{_quote(item['path'])}", target,
                    item["sha256"], int(item["size"]), tick)
        finally:
            run.ui.progress_stop()
        return Moved("https", "from the queue server", size=total, skipped=skipped)

    async def remove(self, run: Run) -> bool:
        from remote_exec.backends.pull.client import QueueAnswer

        try:
            await self.client.call("DELETE", f"/runs/{run.run_id}")
        except QueueAnswer as err:
            if err.status != 404:
                run.ui.warn(f"could not remove run {run.run_id} from the queue server: "
                            f"{err.message}")
                return False
        return True

    async def stop(self, run: Run) -> str:
        return await self._cancel(run.run_id, self.site.cancel_grace)

    async def exit_before_cancel(self, run: Run, what: str) -> int | None:
        state = await self._get(run.run_id)
        if state["state"] == "finished" and state.get("outcome") in ("exited", "signaled"):
            return self._exit_code(run, state)
        return None

    def failure_text(self, run: Run) -> str:
        if run.exit_code == 0:
            return ""
        return f"the entrypoint exited with {run.exit_code} on site {self.site.name}"

    # -- the server's view of the run ----------------------------------------------------------
    async def _get(self, run_id: str, wait: float = 0, after: int = 0) -> dict[str, Any]:
        params = {"wait": f"{wait:g}", "after": str(after)} if wait else None
        timeout = wait + self.settings.request_timeout
        return (await self.client.call("GET", f"/runs/{run_id}", params=params,
                                       timeout=timeout))[1]

    async def _log(self, run_id: str, offset: int) -> tuple[bytes, bool]:
        async def read(response: Any) -> tuple[bytes, bool]:
            return await response.read(), response.headers.get("X-RE-Log-Final") == "1"
        return (await self.client.call("GET", f"/runs/{run_id}/log",
                                       params={"offset": str(offset)}, read=read, ok=(200,)))[1]

    async def _watch(self, run: Run, until: tuple[str, ...],
                     launching: bool = False) -> dict[str, Any]:
        """Long-poll the run until its state is one of ``until``, noting each change."""
        wait = self.settings.poll_wait
        while True:
            state = await self._get(run.run_id, wait, self._version)
            self._version = int(state.get("version") or 0)
            await self._note(run, state)
            if state["state"] in until:
                return state

    async def _note(self, run: Run, state: dict[str, Any]) -> None:
        info = _job_info(state)
        text = describe_state(self.site.name, state)
        stuck = ""
        if state.get("stalled") and not self._stall_said:
            self._stall_said = True
            stuck = (f"the site's poller has been silent since "
                     f"{_ago((state.get('poller') or {}).get('last_seen'))}: the run waits "
                     "for it to come back")
        elif not state.get("stalled"):
            self._stall_said = False
        if state["state"] in QUIET and not stuck:  # (the poller is getting it ready)
            run.job_info = info
            await run.record(job_info=json.dumps(info.to_dict()))
            return
        await run.note_job(info, f"{text}: {stuck}" if stuck else text, stuck)

    def _refusal(self, state: dict[str, Any]) -> SiteRefused:
        reason = state.get("reason") or "refused"
        return SiteRefused(f"site {self.site.name} refused the run ({reason}): "
                           f"{state.get('message') or ''}".rstrip(": "),
                           hint="the site's allowlist decides; ask its administrator "
                           "(nothing was created on the site)")

    def _unclaimed(self, state: dict[str, Any]) -> NotClaimed:
        seen = state.get("site_last_seen")
        return NotClaimed(
            f"no poller of site {self.site.name} claimed run {state.get('id')} within "
            f"{self.settings.queue_timeout:g} s; a poller of the site was last seen "
            f"{_ago(seen)}",
            hint="is remote_exec_poller.py running on the site (and its token valid)? "
            "The site's `pull.queue_timeout` sets how long a run waits")

    async def _cancel(self, run_id: str, grace: float) -> str:
        """Ask the server to cancel; wait (bounded) for the site to stop the entrypoint."""
        before = (await self._get(run_id)).get("state")
        answer = (await self.client.call("POST", f"/runs/{run_id}/cancel", json={}))[1] or {}
        if answer.get("state") == "cancelled":
            if before in ("created", "queued"):
                return "the run was withdrawn from the queue before a poller took it"
            return ("the queue server ended the run; the poller that held it (MInt's "
                    "original poller, which takes no cancel) may still run its command")
        if answer.get("state") in TERMINAL:
            return f"the run had already ended ({answer.get('state')})"
        deadline = time.monotonic() + grace + 20
        version = 0
        while time.monotonic() < deadline:
            wait = min(self.settings.poll_wait, max(deadline - time.monotonic(), 1))
            state = await self._get(run_id, wait, version)
            version = int(state.get("version") or 0)
            if state["state"] in TERMINAL:
                return f"the site's poller stopped it ({state.get('outcome') or state['state']})"
        return ("a cancel was requested; the site's poller stops the entrypoint at its next "
                "heartbeat")

    # -- commands about recorded runs ----------------------------------------------------------
    def describe_job(self, info: JobInfo) -> str:
        return f"pull job {info.job_id}: {info.native}" + (f" ({info.reason})"
                                                             if info.reason else "")

    async def probe(self, record: RunRecord) -> RemoteState:
        from remote_exec.backends.pull.client import QueueAnswer

        try:
            async with self._connected():
                state = await self._get(record.id)
        except QueueAnswer as err:
            if err.status == 404:
                return RemoteState(reachable=True, exists=False)
            return RemoteState(reachable=False, error=err.message)
        except RemoteExecError as err:
            return RemoteState(reachable=False, error=err.message)
        code = None
        if state["state"] == "finished" and state.get("outcome") == "exited":
            code = state.get("exit_code")
        return RemoteState(reachable=True, exists=True, exit_code=code,
                           alive=state["state"] in STARTED,
                           job=describe_state(self.site.name, state))

    async def read_log(self, record: RunRecord, ui: Reporter, follow: bool) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        offset = 0
        delays = POLL.capped(2.0).delays()
        async with self._connected():
            while True:
                data, final = await self._log(record.id, offset)
                offset += len(data)
                if data:
                    ui.log_text(decoder.decode(data))
                    await ui.drain()
                if final or not follow:
                    break
                await asyncio.sleep(0 if data else next(delays))
        ui.log_text(decoder.decode(b"", True))

    async def cancel_recorded(self, record: RunRecord) -> tuple[str, int | None]:
        async with self._connected():
            what = await self._cancel(record.id, self.site.cancel_grace)
            state = await self._get(record.id)
        code = None
        if state["state"] == "finished" and state.get("outcome") == "exited":
            code = state.get("exit_code")
        return what, code

    async def cleanup_runs(self, decide: Callable[[Leftover], bool],
                           ui: Reporter) -> list[Leftover]:
        """The site's runs the queue server holds; each ``decide`` approves is deleted
        (a run not ended yet is cancelled first)."""
        from remote_exec.backends.pull.client import QueueAnswer

        found: list[Leftover] = []
        async with self._connected() as client:
            runs = (await client.call("GET", "/runs", params={"site": self.site.name}))[1]
            for state in sorted(runs.get("runs") or [], key=lambda r: str(r.get("id"))):
                age = _age_days(state.get("updated_at") or state.get("created_at"))
                status = {"finished": "finished", "expired": "finished",
                          "cancelled": "finished", "created": "not launched",
                          "queued": "not launched"}.get(state["state"], "running")
                item = Leftover(path=f"runs/{state['id']}", name=str(state["id"]),
                                age_days=age, state=status)
                found.append(item)
                if not decide(item):
                    continue
                try:
                    if state["state"] not in TERMINAL:
                        await client.call("POST", f"/runs/{state['id']}/cancel", json={})
                    await client.call("DELETE", f"/runs/{state['id']}")
                    item.verdict = "removed"
                except (QueueAnswer, RemoteExecError) as err:
                    item.verdict = "failed"
                    ui.warn(f"could not remove run {state['id']} from the queue server: "
                            f"{err.message}")
        return found

    async def check(self) -> list[Row]:
        rows: list[Row] = []
        try:
            settings = self.settings
            settings.token()
        except RemoteExecError as err:
            return [Row("pull settings", FAIL, err.message, err.hint or "")]
        rows.append(Row("pull settings", OK, f"server {settings.server}, token file "
                        f"{settings.token_file} (private)"))
        try:
            async with self._connected() as client:
                info = (await client.call("GET", f"/sites/{_quote(self.site.name)}"))[1]
        except RemoteExecError as err:
            return [*rows, Row("queue server", FAIL, err.message, err.hint or "")]
        rows.append(Row("queue server", OK, f"answers; {info.get('queued', 0)} run(s) queued, "
                        f"{info.get('running', 0)} running for {self.site.name}"))
        pollers = info.get("pollers") or []
        if pollers:
            text = ", ".join(f"{p.get('host')} (seen {_ago(p.get('last_seen'))})"
                             for p in pollers)
            rows.append(Row("pollers", OK, text))
        else:
            rows.append(Row("pollers", WARN, f"no poller of {self.site.name} was ever seen",
                            "install remote_exec_poller.py on the site (`remote-exec site "
                            "install SITE --poller`) and start it"))
        return rows


def describe_state(site: str, state: dict[str, Any]) -> str:
    """The server's view of a run in one line."""
    name = state.get("state", "?")
    poller = state.get("poller") or {}
    if name in ("created", "queued"):
        return (f"{name}: waiting for a poller of {site} (last seen "
                f"{_ago(state.get('site_last_seen'))})")
    if name in ("claimed", "staging", "staged", "launching"):
        return f"{name} by poller {poller.get('host', '?')} (attempt {state.get('attempt', 1)})"
    if name in ("running", "uploading"):
        pid = f", process group {state['pid']}" if state.get("pid") else ""
        return f"{name} on {poller.get('host', '?')}{pid}"
    if name == "finished":
        outcome = state.get("outcome")
        if outcome == "exited":
            return f"finished: exit code {state.get('exit_code')}"
        if outcome == "signaled":
            return f"finished: killed by signal {state.get('signal')}"
        return f"finished: {outcome} ({state.get('reason') or state.get('message') or ''})"
    return name


def _job_info(state: dict[str, Any]) -> JobInfo:
    name = str(state.get("state", ""))
    common = COMMON.get(name, RUNNING)
    if name == "finished":
        common = COMPLETED if state.get("outcome") == "exited" and \
            state.get("exit_code") == 0 else FAILED
        if state.get("outcome") == "cancelled":
            common = CANCELLED
    poller = state.get("poller") or {}
    return JobInfo(job_id=str(state.get("id", "")), native=name, state=common,
                   reason="stalled" if state.get("stalled") else "",
                   exit_code=state.get("exit_code"), nodes=str(poller.get("host") or ""),
                   extra={"poller": str(poller.get("host") or ""),
                          "attempt": str(state.get("attempt", ""))})


def _describe_inputs(run: Run) -> dict[str, dict[str, Any]]:
    """Each input file by its path in the run directory: size, mode, sha256, source."""
    from remote_exec.digests import digests

    files: dict[str, dict[str, Any]] = {}
    for source, rel in input_files(run.request.inputs):
        info = source.stat()
        files[rel] = {"path": rel, "size": info.st_size, "mode": info.st_mode & 0o777,
                      "source": source}
    found = digests([os.path.realpath(f["source"]) for f in files.values()])
    for item in files.values():
        item["sha256"] = found[os.path.realpath(item["source"])]
    return files


def _holds(target: Path, item: dict[str, Any]) -> bool:
    """Whether an earlier fetch already brought ``item`` to ``target``."""
    from remote_exec.digests import sha256_file

    try:
        return target.stat().st_size == int(item["size"]) and \
            sha256_file(target) == item["sha256"]
    except OSError:
        return False


def _safe(path: str) -> bool:
    from remote_exec.queue.paths import path_problem

    return path_problem(path) is None


def _quote(path: str) -> str:
    from remote_exec.backends.pull.client import quote_path

    return quote_path(path)


def _age_days(stamp: str | None) -> float:
    if not stamp:
        return 0.0
    try:
        then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return max((datetime.now(timezone.utc) - then).total_seconds(), 0.0) / 86400


__all__ = ["PullBackend", "describe_state"]
