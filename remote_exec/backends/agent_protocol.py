"""The client of a restricted site's agent: each request of its protocol, a method.

The site administrator installed ``remote-side_scripts/remote_exec_agent.py`` as the
forced command of the key (``remote-exec site install``), so every exec request on
the connection is a request to the agent, which checks it against the allowlist
file the administrator owns. Here is the client of that protocol:

  ``create RUN_ID``            make ``<root>/RUN_ID`` (and the agent's own state for it);
  ``rsync --server ... RUN_ID/``  stage into / fetch from that one directory (the agent
                               confines rsync and serves a fetch from an outbox that
                               holds only the files the site lets go);
  ``launch RUN_ID NAME``       run approved entrypoint NAME (pinned by sha256), the
                               parameters as JSON on stdin; answers ``started PGID``
                               and ends with the entrypoint's exit code;
  ``launch RUN_ID NAME --batch``  the same checks and records, but the entrypoint is
                               left for a batch job: answers the command the job runs
                               on its compute node (``--batch-job RUN_ID``, which no
                               SSH request can reach);
  ``token``                    a Slurm REST token: what the allowlist's
                               ``token_command`` prints;
  ``cache-place RUN_ID``       before rsync: the inputs the site's content cache may
                               hold (name, size, sha256 and time, JSON on stdin); the
                               agent copies and verifies those it has, answers which;
  ``cache-insert RUN_ID``      after rsync: the agent copies the run's new inputs into
                               the cache (verifying each) and trims it;
  ``cache-trim``               trim the cache (``cleanup``);
  ``wait`` / ``status`` / ``log`` / ``cancel`` / ``remove`` / ``list`` / ``hello``.

No SFTP (the agent refuses it: it could not be confined), no shell.
"""

from __future__ import annotations

import json
import os
import posixpath
import shlex
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import asyncssh

from remote_exec.backends.base import Launched
from remote_exec.entrypoint import AGENT_PREFIX as PREFIX
from remote_exec.entrypoint import ALREADY_LAUNCHED, MARK_WORD, REFUSED
from remote_exec.errors import (
    AuthError,
    ConfigError,
    FetchError,
    RemoteExecError,
    RemoteLostError,
    StageError,
)
from remote_exec.inputs import Input
from remote_exec.ssh import rsync as rsync_mod
from remote_exec.ssh import shell
from remote_exec.ssh.transfer import RSYNC_FETCH_OPTIONS, FetchReport, rsync_hint


class AgentRefused(AuthError):
    """The site's agent refused the request (its policy, not a fault: final, exit 77)."""


@dataclass(frozen=True)
class Prepared:
    """A run the agent prepared for a batch job (``launch --batch``)."""

    command: list[str]  # what the job runs: ``exec`` of it
    output: str  # where the scheduler writes the job's own output
    before: bool  # prepared by an earlier request (a job may exist)

    @classmethod
    def of(cls, answer: dict[str, Any], before: bool) -> Prepared:
        """From the agent's answer to ``launch --batch`` or ``status``."""
        command = answer["job_command"]
        if not isinstance(command, list) or not command:
            raise TypeError("no job command")
        return cls([str(w) for w in command], str(answer.get("job_output") or ""), before)




def agent_request(*words: str) -> shell.Request:
    """The exec request for one agent command, framed past the login shell's output."""
    return lambda mark: shlex.join([MARK_WORD, mark.text, *words])


def agent_rsync(command: str) -> shell.Request:
    """The exec request for rsync's remote command, which the agent confines."""
    return lambda mark: f"{MARK_WORD} {mark.text} {command}"


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _raise_for(status: int | None, stderr: str, what: str, site: str) -> None:
    line = _first_line(stderr)
    if status == REFUSED and line.startswith(PREFIX):
        raise AgentRefused(f"{site} refused to {what}: {line[len(PREFIX):]}",
                           hint="the site's allowlist decides; ask its administrator")
    if MARK_WORD in line and "is not an agent command" in line:
        raise ConfigError(
            f"{site}'s remote-exec agent is older than this remote-exec ({line})",
            hint="install the current agent: `remote-exec site install SITE --apply`")
    if line.startswith(PREFIX):
        raise RemoteExecError(f"{site}: the agent could not {what}: {line[len(PREFIX):]}")
    if status == 127 or "not found" in line:
        raise ConfigError(
            f"{site} is marked `restricted` but no remote-exec agent answered ({line})",
            hint="install the agent with `remote-exec site install SITE --apply`, or drop "
            "`restricted: true` from the site",
        )
    raise RemoteExecError(f"{site}: the agent could not {what} (exit {status}): {line}")


class AgentClient:
    """The agent's requests, each a method (errors say who refused and why)."""

    def __init__(self, site_name: str = "the site") -> None:
        self.site = site_name

    async def call(self, conn: asyncssh.SSHClientConnection, *words: str,
                   stdin: str | None = None, what: str = "") -> dict[str, Any]:
        """Run one agent command; its JSON answer, or an error that says who refused."""
        result = await shell.run_request(conn, agent_request(*words), input=stdin)
        if result.exit_status != 0:
            _raise_for(result.exit_status, result.stderr or result.banner_err,
                       what or " ".join(words[:1]), self.site)
        try:
            return cast(dict[str, Any], json.loads(result.stdout))
        except ValueError:
            raise RemoteExecError(f"{self.site}: the agent's answer to {words[0]} is not "
                                  f"JSON: {_first_line(result.stdout)[:200]}") from None

    async def hello(self, conn: asyncssh.SSHClientConnection) -> dict[str, Any]:
        return await self.call(conn, "hello", what="say hello")

    async def create(self, conn: asyncssh.SSHClientConnection, run_id: str,
                     retrying: bool) -> str:
        answer = await self.call(conn, "create", run_id, what="create the run directory")
        if answer.get("existed") and not retrying:
            raise StageError(f"the run directory {answer.get('rundir')} already exists "
                             "(refusing to reuse it)")
        return str(answer["rundir"])

    async def stage(self, rsh: str, inputs: Sequence[Input], run_id: str,
                    progress: bool) -> None:
        if not inputs:
            return
        if rsync_mod.local_rsync() is None:
            raise StageError("a restricted site moves files with rsync, and rsync is not "
                             "installed here", hint="install rsync (apt-get install rsync)")
        sources = [os.path.abspath(i.source) for i in inputs]
        code, err = await rsync_mod.run_rsync(
            rsh, ["-a", "-L", "--partial", *sources, rsync_mod.rsync_remote(run_id + "/")],
            progress=progress)
        if code != 0:
            self._rsync_failed(err, code, StageError, "copy the inputs")

    async def fetch(self, rsh: str, run_id: str, dest: Path, progress: bool) -> FetchReport:
        if rsync_mod.local_rsync() is None:
            raise FetchError("a restricted site moves files with rsync, and rsync is not "
                             "installed here", hint="install rsync, then `remote-exec resume`")
        code, err = await rsync_mod.run_rsync(
            rsh, [*RSYNC_FETCH_OPTIONS, "-r", "--safe-links",
                  rsync_mod.rsync_remote(run_id + "/"), str(dest) + "/"], progress=progress)
        if code != 0:
            self._rsync_failed(err, code, FetchError, "send the results back")
        return FetchReport(method="rsync")

    def _rsync_failed(self, err: str, code: int, error: type[RemoteExecError],
                      what: str) -> None:
        for line in err.splitlines():
            if line.startswith(PREFIX):
                _raise_for(REFUSED if "refused" in line else 1, line, what, self.site)
        raise error(f"rsync could not {what} on {self.site} (rsync exit {code}): "
                    f"{err[-2000:]}",
                    hint=rsync_hint(err, "free space on the remote host if it is full; "
                                    "otherwise see rsync's message"))

    async def launch(self, conn: asyncssh.SSHClientConnection, run_id: str, entry: str,
                     params: dict[str, Any]) -> Launched:
        started = await shell.start_request(conn, agent_request("launch", run_id, entry),
                                            stdin=asyncssh.PIPE)
        process = started.process
        process.stdin.write(json.dumps(params))
        process.stdin.write_eof()
        line = cast(str, await process.stdout.readline()) if started.framed else ""
        if line.startswith("started "):
            return Launched(job_id=line.split()[1], channel=process)
        await process.wait_closed()
        if process.exit_status == ALREADY_LAUNCHED:
            status = await self.status(conn, run_id)
            pgid = status.get("pgid")
            return Launched(job_id=str(pgid) if pgid else None, before=True)
        if process.exit_status is None and conn.is_closed():
            raise asyncssh.ConnectionLost("the connection closed while launching")
        err = cast(str, await process.stderr.read()) if started.framed \
            else str(started.banner_err)
        _raise_for(process.exit_status, err, f"launch {entry}", self.site)
        raise AssertionError("unreachable")

    async def launch_batch(self, conn: asyncssh.SSHClientConnection, run_id: str, entry: str,
                           params: dict[str, Any]) -> Prepared:
        """Prepare run ``run_id`` for a batch job that runs approved entrypoint ``entry``:
        the command the job must run (its script: ``exec`` of it) and where the scheduler
        writes the job's output. A run prepared before (a retried request) answers what
        it was prepared with, ``before`` set: a job may have been submitted already."""
        result = await shell.run_request(conn, agent_request("launch", run_id, entry, "--batch"),
                                         input=json.dumps(params))
        if result.exit_status is None and conn.is_closed():
            raise asyncssh.ConnectionLost("the connection closed while preparing the job")
        if result.exit_status == ALREADY_LAUNCHED:
            status = await self.status(conn, run_id)
            if not isinstance(status.get("job_command"), list):
                raise RemoteExecError(f"{self.site}: run {run_id} was already launched, "
                                      "not for a batch job")
            return Prepared.of(status, before=True)
        if result.exit_status != 0:
            _raise_for(result.exit_status, result.stderr or result.banner_err,
                       f"launch {entry}", self.site)
        try:
            return Prepared.of(json.loads(result.stdout), before=False)
        except (ValueError, KeyError, TypeError):
            raise RemoteExecError(f"{self.site}: the agent's answer to launch --batch is not "
                                  f"its job's command: {_first_line(result.stdout)[:200]}"
                                  ) from None

    async def token(self, conn: asyncssh.SSHClientConnection) -> str:
        """A Slurm REST token: what the site's ``token_command`` printed, as it is."""
        result = await shell.run_request(conn, agent_request("token"))
        if result.exit_status != 0:
            _raise_for(result.exit_status, result.stderr or result.banner_err,
                       "give a Slurm token", self.site)
        return result.stdout

    async def status(self, conn: asyncssh.SSHClientConnection, run_id: str) -> dict[str, Any]:
        return await self.call(conn, "status", run_id, what="report the run's status")

    async def wait(self, conn: asyncssh.SSHClientConnection, run_id: str) -> int:
        """Block until the entrypoint ends (on the host); its exit code."""
        result = await shell.run_request(conn, agent_request("wait", run_id))
        if result.exit_status is None and conn.is_closed():
            raise asyncssh.ConnectionLost("the connection closed while waiting")
        if result.exit_status == 3:
            raise RemoteLostError(
                f"the entrypoint of run {run_id} is gone and left no exit code (was the "
                "remote host rebooted, or the process killed with KILL?)",
                hint="`remote-exec logs` shows what it wrote")
        if result.exit_status != 0:
            _raise_for(result.exit_status, result.stderr or result.banner_err,
                       "wait for the run", self.site)
        return int(json.loads(result.stdout)["exit_code"])

    async def cancel(self, conn: asyncssh.SSHClientConnection, rundir: str,
                     grace: float) -> str:
        answer = await self.call(conn, "cancel", posixpath.basename(rundir.rstrip("/")),
                                 str(int(grace)), what="cancel the run")
        return str(answer.get("result", "cancelled"))

    async def remove(self, conn: asyncssh.SSHClientConnection, run_id: str) -> bool:
        answer = await self.call(conn, "remove", run_id, what="remove the run directory")
        return bool(answer.get("removed"))

    async def cache_place(self, conn: asyncssh.SSHClientConnection, run_id: str,
                          files: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Ask the agent to place ``files`` (``{name, size, sha256, mtime_ns}``, names
        relative to the run directory) from its content cache: ``{"enabled", "placed":
        [names], "changed": [entries removed]}`` or ``{"enabled": false, "why"}``."""
        return await self.call(conn, "cache-place", run_id, stdin=json.dumps({"files": files}),
                               what="place inputs from its content cache")

    async def cache_insert(self, conn: asyncssh.SSHClientConnection, run_id: str,
                           files: Sequence[dict[str, Any]], max_size: int,
                           max_age: float) -> dict[str, Any]:
        """Ask the agent to add the run's staged ``files`` to its content cache, then trim
        it: ``{"enabled", "inserted": n, "trimmed": [{path, size, why, verdict}]}``."""
        request = {"files": list(files), "max_size": max_size, "max_age": max_age}
        return await self.call(conn, "cache-insert", run_id, stdin=json.dumps(request),
                               what="add inputs to its content cache")

    async def cache_trim(self, conn: asyncssh.SSHClientConnection, max_size: int,
                         max_age: float, dry_run: bool) -> dict[str, Any]:
        """Ask the agent to trim its content cache (with ``dry_run``, only to say what
        would go): ``{"enabled", "trimmed": [{path, size, why, verdict}]}``."""
        request = {"max_size": max_size, "max_age": max_age, "dry_run": dry_run}
        return await self.call(conn, "cache-trim", stdin=json.dumps(request),
                               what="trim its content cache")

    async def runs(self, conn: asyncssh.SSHClientConnection) -> list[dict[str, Any]]:
        answer = await self.call(conn, "list", what="list its runs")
        return list(answer.get("runs", []))

    async def read_log(self, conn: asyncssh.SSHClientConnection, run_id: str, offset: int,
                       follow: bool, sink: Callable[[bytes], Awaitable[None]]) -> None:
        """Stream the run's log from ``offset`` into ``sink`` (to the run's end with
        ``follow``)."""
        words = ["log", run_id, "--offset", str(offset)] + (["--follow"] if follow else [])
        started = await shell.start_request(conn, agent_request(*words), encoding=None,
                                            stdin=asyncssh.DEVNULL)
        process = started.process
        try:
            while True:
                data = cast(bytes, await process.stdout.read(65536))
                if not data:
                    break
                await sink(data)  # (back-pressure: the sink waits for its reader)
            await process.wait_closed()
        finally:
            process.close()
        if process.exit_status not in (0, None):
            err = cast(bytes, await process.stderr.read()) if started.framed \
                else cast(bytes, started.banner_err)
            _raise_for(process.exit_status, err.decode("utf-8", "replace"), "show the log",
                       self.site)


