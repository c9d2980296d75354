"""Moving files between the local side and a run directory: SFTP, or rsync when it pays.

Both methods go over the run's single SSH connection. SFTP needs no remote shell
(OpenSSH serves it in-process), so for small payloads it is cheaper than rsync,
whose server side is started through the remote login shell. rsync wins on large
or repeated transfers (delta, compression-free streaming); see the README's
design notes for the measured crossover.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from remote_exec.errors import FetchError, StageError
from remote_exec.inputs import CONTROL_DIR, Input
from remote_exec.ssh import rsync as rsync_mod

ProgressFn = Callable[[str, int, int], None]


@dataclass
class FetchReport:
    """What a fetch brought back, and what it refused to."""

    method: str
    skipped: list[str] = field(default_factory=list)


async def choose_method(
    conn: asyncssh.SSHClientConnection, policy: str, size: int, threshold: int,
    remote_rsync_cache: dict[str, bool],
) -> str:
    """``rsync`` or ``sftp`` for a transfer of ``size`` bytes under ``policy``.

    ``auto`` takes rsync for payloads of at least ``threshold`` bytes when both ends
    have it; ``rsync`` takes it whenever both ends have it; ``sftp`` never does.
    """
    if policy == "sftp" or rsync_mod.local_rsync() is None:
        return "sftp"
    if policy == "auto" and size < threshold:
        return "sftp"
    if "remote" not in remote_rsync_cache:
        remote_rsync_cache["remote"] = await rsync_mod.remote_has_rsync(conn)
    return "rsync" if remote_rsync_cache["remote"] else "sftp"


async def stage_sftp(sftp: asyncssh.SFTPClient, inputs: Sequence[Input], rundir: str,
                     progress: ProgressFn | None) -> None:
    """Copy inputs into ``rundir`` following symlinks (like ``rsync -a -L``)."""
    if not inputs:
        return
    handler = _sftp_progress(progress)
    try:
        await sftp.put(
            [os.fsencode(os.path.abspath(i.source)) for i in inputs],
            os.fsencode(rundir),
            recurse=True, preserve=True, follow_symlinks=True, progress_handler=handler,
        )
    except (OSError, asyncssh.SFTPError) as exc:
        raise StageError(
            f"copying inputs into {rundir} failed: {_reason(exc)}",
            hint=await _disk_hint(sftp, rundir, sum(i.size for i in inputs)),
        ) from None


async def stage_rsync(rsh: str, inputs: Sequence[Input], rundir: str, progress: bool) -> None:
    """Copy inputs into ``rundir`` with ``rsync -a -L`` through the tunnel."""
    sources = [os.path.abspath(i.source) for i in inputs]
    code, err = await rsync_mod.run_rsync(
        rsh, ["-a", "-L", *sources, rsync_mod.rsync_remote(rundir + "/")], progress=progress
    )
    if code != 0:
        raise StageError(
            f"rsync could not copy the inputs into {rundir} (rsync exit {code}): {err[-2000:]}",
            hint="free space on the remote host if it is full; otherwise see rsync's message",
        )


async def fetch_sftp(sftp: asyncssh.SFTPClient, rundir: str, dest: Path,
                     progress: ProgressFn | None) -> FetchReport:
    """Copy the whole run directory (but the control directory) into ``dest``.

    Symlinks are copied as symlinks; one that points outside the directory is
    skipped and reported, so a run can never plant a link to a local file.
    """
    report = FetchReport(method="sftp")

    def on_error(exc: Exception) -> None:
        if isinstance(exc, asyncssh.SFTPBadMessage) and "Symlink" in str(exc):
            report.skipped.append(str(exc))
            return
        raise exc

    try:
        names = [n for n in await sftp.listdir(os.fsencode(rundir))
                 if n not in (b".", b"..", CONTROL_DIR.encode())]
        if names:
            await sftp.get(
                [posixpath.join(os.fsencode(rundir), n) for n in names], os.fsencode(dest),
                recurse=True, preserve=True, follow_symlinks=False,
                progress_handler=_sftp_progress(progress), error_handler=on_error,
            )
    except (OSError, asyncssh.SFTPError) as exc:
        raise FetchError(
            f"copying results back from {rundir} failed: {_reason(exc)}",
            hint=f"the remote directory is kept; retry, or copy it by hand from {rundir}",
        ) from None
    return report


async def fetch_rsync(rsh: str, rundir: str, dest: Path, progress: bool) -> FetchReport:
    """Copy the run directory (but the control directory) into ``dest`` with ``rsync -a``."""
    code, err = await rsync_mod.run_rsync(
        rsh,
        ["-a", f"--exclude=/{CONTROL_DIR}", rsync_mod.rsync_remote(rundir + "/"), str(dest) + "/"],
        progress=progress,
    )
    if code != 0:
        raise FetchError(
            f"rsync could not copy results back from {rundir} (rsync exit {code}): {err[-2000:]}",
            hint=f"the remote directory is kept; retry, or copy it by hand from {rundir}",
        )
    return FetchReport(method="rsync")


async def remote_size(sftp: asyncssh.SFTPClient, rundir: str) -> int:
    """Total bytes of regular files under ``rundir`` (control directory excluded)."""
    total = 0
    stack = [os.fsencode(rundir)]
    while stack:
        current = stack.pop()
        async for entry in sftp.scandir(current):
            if entry.filename in (b".", b"..") or (
                current == os.fsencode(rundir) and entry.filename == CONTROL_DIR.encode()
            ):
                continue
            if entry.attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY:
                stack.append(posixpath.join(current, os.fsencode(entry.filename)))
            elif entry.attrs.type == asyncssh.FILEXFER_TYPE_REGULAR:
                total += entry.attrs.size or 0
    return total


def _sftp_progress(progress: ProgressFn | None) -> Callable[[bytes, bytes, int, int], None] | None:
    if progress is None:
        return None

    def handler(src: bytes, dst: bytes, done: int, total: int) -> None:
        progress(os.fsdecode(posixpath.basename(src)), done, total)

    return handler


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.SFTPError):
        return exc.reason or type(exc).__name__
    return str(exc)


async def _disk_hint(sftp: asyncssh.SFTPClient, path: str, needed: int) -> str:
    try:
        vfs = await sftp.statvfs(path)
        free = vfs.bavail * vfs.frsize
    except (OSError, asyncssh.Error):
        return "check free space and permissions under the site's root"
    if free < max(needed, 1) * 1.05 + 1024 * 1024:
        return (f"the remote file system is (nearly) full: {free} bytes free, "
                f"{needed} needed; free space there or set another root for the site")
    return "check permissions under the site's root"
