"""A small backend of the tests' own, registered as a plugin would be (the
``remote_exec.backends`` entry point group): runs live in a local directory (the site's
``root``) and the entrypoint runs on this machine, started by the same control scripts
(launch.sh, run.sh, cancel.sh) an SSH site gets. It shows that a backend is one module:
nothing in the engine, the CLI or the journal knows its name."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from remote_exec.backends.base import (
    Backend,
    Launched,
    Leftover,
    Moved,
    NoSession,
    RemoteState,
    Run,
)
from remote_exec.entrypoint import ALREADY_LAUNCHED, control_argv
from remote_exec.errors import StageError
from remote_exec.inputs import CONTROL_DIR, LOG_NAME
from remote_exec.site.rows import FAIL, OK, Row


class LocalDirBackend(Backend):
    """Run in ``<site root>/<run id>`` on this machine."""

    name = "localdir"
    summary = "a directory on this machine (the tests' plugin)"
    registration = {"over_ssh": False}

    async def open(self, ui: Any, **how: Any) -> NoSession:
        return NoSession(lambda exc: False)

    def _dir(self, run_id: str) -> Path:
        return Path(self.site.root) / run_id

    async def create(self, run: Run) -> str:
        await run.set_rundir(str(self._dir(run.run_id)))
        (Path(run.rundir) / CONTROL_DIR).mkdir(parents=True, exist_ok=run.retrying)
        return run.rundir

    async def stage(self, run: Run) -> Moved:
        top = Path(run.rundir)
        for name, data in run.request.entrypoint.control_files().items():
            (top / CONTROL_DIR / name).write_bytes(data)
        for item in run.request.inputs:
            if item.is_dir:
                shutil.copytree(item.source, top / item.name, dirs_exist_ok=True)
            else:
                shutil.copy2(item.source, top / item.name)
        return Moved("copy", size=sum(i.size for i in run.request.inputs))

    async def launch(self, run: Run) -> Launched:
        proc = await asyncio.create_subprocess_exec(
            *control_argv(run.rundir, "launch.sh"), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True)
        assert proc.stdout is not None
        line = (await proc.stdout.readline()).decode()
        if line.startswith("started "):
            return Launched(job_id=line.split()[1], channel=proc)
        await proc.wait()
        if proc.returncode == ALREADY_LAUNCHED:
            return Launched(job_id=self._read(run.rundir, "pgid"), before=True)
        raise StageError(f"launch.sh exit {proc.returncode}")

    def _read(self, rundir: str, name: str) -> str | None:
        try:
            return (Path(rundir) / CONTROL_DIR / name).read_text().strip()
        except OSError:
            return None

    async def wait(self, run: Run, launched: Launched | None) -> int:
        while True:
            code = self._read(run.rundir, "exit_code")
            if code:
                return int(code)
            await asyncio.sleep(0.1)

    async def fetch(self, run: Run, partial: Path) -> Moved:
        top = Path(run.rundir)
        size = 0
        for path in top.rglob("*"):
            rel = path.relative_to(top)
            if rel.parts[0] == CONTROL_DIR or path.is_dir():
                continue
            (partial / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, partial / rel)
            size += path.stat().st_size
        return Moved("copy", size=size)

    async def remove(self, run: Run) -> bool:
        shutil.rmtree(run.rundir, ignore_errors=True)
        return True

    async def stop(self, run: Run) -> str:
        return await self._cancel(run.rundir)

    async def _cancel(self, rundir: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            *control_argv(rundir, "cancel.sh", int(self.site.cancel_grace)),
            stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        return out.decode().strip() or f"cancel.sh exit {proc.returncode}"

    async def probe(self, record: Any) -> RemoteState:
        rundir = record.rundir or ""
        if not os.path.isdir(rundir):
            return RemoteState(reachable=True)
        code = self._read(rundir, "exit_code")
        pgid = self._read(rundir, "pgid")
        alive = os.path.exists(f"/proc/{pgid}") if pgid else None
        return RemoteState(reachable=True, exists=True,
                           exit_code=int(code) if code else None, alive=alive)

    async def read_log(self, record: Any, ui: Any, follow: bool) -> None:
        ui.log_text((Path(record.rundir) / LOG_NAME).read_text())

    async def cancel_recorded(self, record: Any) -> tuple[str, int | None]:
        return await self._cancel(record.rundir), None

    async def cleanup_runs(self, decide: Callable[[Leftover], bool],
                           ui: Any) -> list[Leftover]:
        found = []
        for path in sorted(Path(self.site.root).glob("*/" + CONTROL_DIR)):
            item = Leftover(path=str(path.parent),
                            age_days=(time.time() - path.stat().st_mtime) / 86400,
                            state="finished" if (path / "exit_code").exists() else "running")
            found.append(item)
            if decide(item):
                shutil.rmtree(path.parent)
                item.verdict = "removed"
        return found

    async def check(self) -> list[Row]:
        root = Path(self.site.root)
        ok = root.is_dir() and os.access(root, os.W_OK)
        return [Row("runs root", OK if ok else FAIL, f"{root} "
                    f"{'writable' if ok else 'missing or not writable'}")]
