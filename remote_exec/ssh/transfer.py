"""Moving files between the local side and a run directory: SFTP, or rsync (or one tar
stream, for many small files: :func:`auto_wants_tar`, :mod:`remote_exec.ssh.tarfetch`)
when it pays.

Both methods go over the run's single SSH connection. SFTP needs no remote shell
(OpenSSH serves it in-process), so for small payloads it is cheaper than rsync,
whose server side is started through the remote login shell. rsync wins on large
or repeated transfers (delta, compression-free streaming) and on many files (SFTP
pays round trips per file, rsync streams the list); :func:`choose_method` decides,
from the measurements in the README's *Measured* section.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import posixpath
import shutil
import stat
import tempfile
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from remote_exec import localfs
from remote_exec.errors import FetchError, StageError
from remote_exec.inputs import CONTROL_DIR, Input
from remote_exec.ssh import rsync as rsync_mod
from remote_exec.ssh import shell

ProgressFn = Callable[[str, int, int], None]


@dataclass
class FetchReport:
    """What a fetch brought back, and what it refused to."""

    method: str
    skipped: list[str] = field(default_factory=list)


#: ``transfer: auto`` takes rsync for a transfer of more than this many entries (files,
#: directories and links), whatever their size: SFTP pays a few round trips per entry
#: (open, write or read, close, attributes; CPU-bound in asyncssh, so more requests in
#: flight barely help), rsync a fixed start-up per transfer (its server through the
#: remote login shell, two local processes, about 0.3 s each way) and then streams the
#: list. Measured with benchmarks/many_files.py against a stock loopback sshd (README,
#: *Measured*): SFTP ahead at 71 entries each way, even at about 200, rsync ahead from
#: about 400 and 2.2x faster over the whole run at 20,000 files each way.
AUTO_RSYNC_FILES = 200


def auto_wants_rsync(size: int, files: int, threshold: int) -> bool:
    """``transfer: auto``'s rule: rsync for more than :data:`AUTO_RSYNC_FILES` entries or
    for at least ``threshold`` bytes (the site's ``rsync_threshold``), SFTP otherwise."""
    return files > AUTO_RSYNC_FILES or size >= threshold


async def choose_method(
    conn: asyncssh.SSHClientConnection, policy: str, size: int, threshold: int,
    remote_rsync_cache: dict[str, bool], files: int = 1,
) -> str:
    """``rsync`` or ``sftp`` for a transfer of ``files`` entries and ``size`` bytes under
    ``policy``.

    ``auto`` takes rsync when :func:`auto_wants_rsync` says so and both ends have it;
    ``rsync`` takes it whenever both ends have it; ``sftp`` never does.
    """
    if policy == "sftp" or rsync_mod.local_rsync() is None:
        return "sftp"
    if policy == "auto" and not auto_wants_rsync(size, files, threshold):
        return "sftp"
    if "remote" not in remote_rsync_cache:
        remote_rsync_cache["remote"] = await rsync_mod.remote_has_rsync(conn)
    return "rsync" if remote_rsync_cache["remote"] else "sftp"


def count_entries(inputs: Sequence[Input], limit: int) -> int:
    """How many entries (files, directories, links) staging ``inputs`` moves, counted
    up to just past ``limit`` (all that the choice needs: a large tree is not walked to
    its end). Walks local trees: call it in a thread."""
    count = 0
    for item in inputs:
        count += 1
        if item.is_dir:
            for _dirpath, dirnames, filenames in os.walk(item.source, followlinks=True):
                count += len(dirnames) + len(filenames)
                if count > limit:
                    return count
        if count > limit:
            return count
    return count


async def stage_sftp(sftp: asyncssh.SFTPClient, inputs: Sequence[Input], rundir: str,
                     progress: ProgressFn | None, *, resume: bool = False,
                     placed: Collection[str] | None = None) -> None:
    """Copy inputs into ``rundir`` following symlinks (like ``rsync -a -L``).

    With ``resume`` (a retry after a dropped connection) directories may exist and
    files whose size and mtime already match are not copied again. ``placed``: the
    (normalised) remote paths already put there from the site's content cache, which
    are not copied; directories may exist then too.
    """
    if not inputs:
        return
    handler = _sftp_progress(progress)
    jobs: list[tuple[bytes, bytes]] = []
    try:
        for item in inputs:
            source = os.fsencode(os.path.abspath(item.source))
            target = posixpath.join(os.fsencode(rundir), os.fsencode(item.name))
            if not item.is_dir:
                jobs.append((source, target))
                continue
            # our own walk: asyncssh's recursive copy refuses names with a backslash; in
            # a thread, so a large local tree does not stall other runs' traffic
            tree = await asyncio.to_thread(lambda s=source: list(os.walk(s, followlinks=True)))
            for dirpath, _dirnames, filenames in tree:
                remote_dir = posixpath.join(target, os.path.relpath(dirpath, source))
                if not ((resume or placed is not None)
                        and await sftp.isdir(posixpath.normpath(remote_dir))):
                    await sftp.mkdir(posixpath.normpath(remote_dir))
                for filename in filenames:
                    jobs.append((os.path.join(dirpath, filename),
                                 posixpath.join(remote_dir, filename)))
                await sftp.setstat(posixpath.normpath(remote_dir), _local_attrs(dirpath))
        if placed:
            skip = {os.fsencode(p) for p in placed}
            jobs = [job for job in jobs if posixpath.normpath(job[1]) not in skip]
        if resume:
            jobs = [job for job in jobs if not await _same_remote(sftp, *job)]
        await _gather_limited(
            sftp.put(src, dst, preserve=True, follow_symlinks=True, progress_handler=handler)
            for src, dst in jobs
        )
        for item in inputs:  # directory times last: writing into them changed them
            if item.is_dir:
                await _restore_dir_times(sftp, os.fsencode(os.path.abspath(item.source)),
                                         posixpath.join(os.fsencode(rundir),
                                                        os.fsencode(item.name)))
    except (OSError, asyncssh.SFTPError) as exc:
        raise StageError(
            f"copying inputs into {rundir} failed: {_reason(exc)}",
            hint=await _disk_hint(sftp, rundir, sum(i.size for i in inputs)),
        ) from None


def rsync_hint(err: str, otherwise: str) -> str:
    """What to do about a failed rsync: its protocol garbled by text from the remote login
    shell (a shell that remote-exec's framing could not get past), or ``otherwise``."""
    if "protocol version mismatch" in err or "is your shell clean" in err:
        return shell.QUIET_SHELL_FIX
    return otherwise


async def stage_rsync(rsh: str, inputs: Sequence[Input], rundir: str, progress: bool) -> None:
    """Copy inputs into ``rundir`` with ``rsync -a -L --partial`` through the tunnel
    (a retry after a dropped connection continues from the partial file)."""
    sources = [os.path.abspath(i.source) for i in inputs]
    code, err = await rsync_mod.run_rsync(
        rsh, ["-a", "-L", "--partial", *sources, rsync_mod.rsync_remote(rundir + "/")],
        progress=progress,
    )
    if code != 0:
        raise StageError(
            f"rsync could not copy the inputs into {rundir} (rsync exit {code}): {err[-2000:]}",
            hint=rsync_hint(err, "free space on the remote host if it is full; otherwise "
                            "see rsync's message"),
        )


#: sh: unpack the tar stream on stdin into the run directory ($1), modes and times kept
#: (``rsync -a``'s), owned by the SSH user
_UNTAR = 'cd -- "$1" && exec tar -x -p --no-same-owner -f -'
#: ``sh``'s exit statuses for a command it cannot run: not executable, not there
NOT_RUNNABLE = (126, 127)


def auto_wants_tar(size: int, files: int, threshold: int) -> bool:
    """``transfer: auto``'s rule for moving many small files, staging and fetching alike:
    one tar stream over one exec channel (staging: local ``tar`` into the remote one;
    fetching: the remote ``tar`` unpacked by :mod:`remote_exec.ssh.tarfetch`) instead of
    rsync, whose per-file exchanges cost most through the tunnel (README *Measured*,
    ``many_files.py``). Large payloads keep rsync, which resumes a partial file after a
    dropped connection."""
    return files > AUTO_RSYNC_FILES and size < threshold


async def stage_tar(conn: asyncssh.SSHClientConnection, inputs: Sequence[Input],
                    rundir: str, progress: ProgressFn | None) -> bool:
    """Copy inputs into ``rundir`` as one tar stream, symlinks followed (like ``rsync -a
    -L``); False, having changed nothing, when either end has no tar (then another
    method does it)."""
    tar = shutil.which("tar")
    if tar is None or not inputs:
        return False
    # each input under its run directory name: a private directory of links to them,
    # which tar follows (-h); names travel as arguments, never through a shell
    links = tempfile.mkdtemp(prefix="remote-exec-tar-")
    try:
        for item in inputs:
            os.symlink(os.path.abspath(item.source), os.path.join(links, item.name))
        started = await shell.start(conn, _UNTAR, rundir, encoding=None)
        remote = started.process
        local = await asyncio.create_subprocess_exec(
            tar, "-c", "-h", "-f", "-", "-C", links, "--", *(f"./{i.name}" for i in inputs),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        sent, cut = 0, False
        try:
            assert local.stdout is not None and local.stderr is not None
            while chunk := await local.stdout.read(1 << 18):
                try:
                    remote.stdin.write(chunk)
                    await remote.stdin.drain()
                except (OSError, asyncssh.Error):
                    if conn.is_closed():
                        raise
                    cut = True  # the remote tar stopped reading: its status says why
                    break
                sent += len(chunk)
                if progress is not None:  # (the stream's bytes: headers and padding too)
                    progress("tar stream", sent, 0)
            if cut:
                local.kill()
            else:
                with contextlib.suppress(OSError, asyncssh.Error):
                    remote.stdin.write_eof()
            local_err = (await local.stderr.read()).decode("utf-8", "replace").strip()
            local_code = await local.wait()
            await remote.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                local.kill()
            remote.close()
            raise
        remote_err = (await remote.stderr.read()).decode("utf-8", "replace").strip()
        status = remote.exit_status
        if not started.framed or status in NOT_RUNNABLE or (cut and status == 0):
            return False  # no (working) tar there: it unpacked nothing
        if status != 0:
            raise StageError(f"tar could not unpack the inputs into {rundir} (exit "
                             f"{status}): {remote_err[-1000:]}",
                             hint="free space on the remote host if it is full; otherwise "
                             "see tar's message")
        if local_code != 0:
            raise StageError(f"tar could not read the inputs (tar exit {local_code}): "
                             f"{local_err[-1000:]}")
        return True
    finally:
        shutil.rmtree(links, ignore_errors=True)


@dataclass
class FetchPlan:
    """What of a run directory comes back, decided once for SFTP and rsync alike."""

    entries: list[tuple[str, asyncssh.SFTPAttrs]]  # directories first, then what they hold
    files: list[str] | None  # rsync's --files-from; None: the whole directory
    size: int  # bytes of the regular files
    skipped: list[str] = field(default_factory=list)  # left out, for a warning each
    unchanged: int = 0  # copies of inputs left as staged: not transferred back


def plan_fetch(entries: Sequence[tuple[str, asyncssh.SFTPAttrs]],
               keep: Callable[[str], bool] | None, inputs: Sequence[Input]) -> FetchPlan:
    """Choose what comes back from :func:`walk_remote`'s ``entries``: what ``keep`` (the
    return filter) accepts, but never a special file (device, FIFO, socket) nor a copy
    of an input the entrypoint left unchanged. A directory comes back when ``keep``
    accepts it and it was not staged from an input, or when something in it comes back.
    """
    staged = localfs.StagedInputs(inputs)
    chosen: list[tuple[str, asyncssh.SFTPAttrs]] = []
    wanted_dirs: set[str] = set()
    skipped: list[str] = []
    unchanged = 0
    for rel, attrs in entries:
        kind = attrs.type
        if kind == asyncssh.FILEXFER_TYPE_DIRECTORY:
            if (keep is None or keep(rel)) and not staged.is_dir(rel):
                wanted_dirs.add(rel)
            continue
        if keep is not None and not keep(rel):
            continue
        if kind not in (asyncssh.FILEXFER_TYPE_REGULAR, asyncssh.FILEXFER_TYPE_SYMLINK):
            what = localfs.kind_of(attrs.permissions or 0)
            skipped.append(f"{rel} (a {what}: only files, directories and symlinks come back)")
            continue
        if kind == asyncssh.FILEXFER_TYPE_REGULAR and staged.unchanged(rel, attrs.size,
                                                                       attrs.mtime):
            unchanged += 1
            continue
        chosen.append((rel, attrs))
        wanted_dirs.update(_parents(rel))
    dirs = [(rel, attrs) for rel, attrs in entries
            if attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY and rel in wanted_dirs]
    whole = keep is None and not skipped and not unchanged and len(dirs) == sum(
        attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY for _rel, attrs in entries)
    skipped += [f"the setuid/setgid bit of {rel} (cleared)" for rel, attrs in dirs + chosen
                if attrs.type != asyncssh.FILEXFER_TYPE_SYMLINK
                and (attrs.permissions or 0) & ~localfs.SAFE_MODE_BITS & 0o7777]
    return FetchPlan(
        entries=dirs + chosen,
        files=None if whole else [rel for rel, _attrs in dirs + chosen],
        size=sum(attrs.size or 0 for _rel, attrs in chosen
                 if attrs.type == asyncssh.FILEXFER_TYPE_REGULAR),
        skipped=skipped, unchanged=unchanged)


def _parents(rel: str) -> list[str]:
    parts = rel.split("/")[:-1]
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


async def fetch_sftp(sftp: asyncssh.SFTPClient, rundir: str, dest: Path,
                     progress: ProgressFn | None, plan: FetchPlan) -> FetchReport:
    """Copy what ``plan`` chose of the run directory into ``dest`` (a partial directory,
    which may hold an earlier attempt: files whose size and mtime match are kept).

    Symlinks are copied as symlinks, whatever they point to (:func:`localfs.place`
    checks them all before anything is placed). Nothing is chowned, and modes lose
    their setuid/setgid bits.
    """
    handler = _sftp_progress(progress)
    root = os.fsencode(rundir)
    local_root = os.fsencode(dest)
    jobs: list[tuple[bytes, bytes, asyncssh.SFTPAttrs]] = []
    dirs: list[tuple[bytes, asyncssh.SFTPAttrs]] = []
    try:
        for rel, attrs in plan.entries:  # (a directory comes before what it holds)
            child = os.fsencode(rel)
            remote, local = posixpath.join(root, child), os.path.join(local_root, child)
            if attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY:
                _clear_non_dir(local)
                os.makedirs(local, exist_ok=True)
                dirs.append((local, attrs))
            elif attrs.type == asyncssh.FILEXFER_TYPE_SYMLINK:
                target = os.fsencode(await sftp.readlink(remote))
                if os.path.lexists(local):
                    os.unlink(local)
                os.symlink(target, local)
            elif not _same_local(local, attrs):
                if os.path.islink(local):  # never write through a link
                    os.unlink(local)
                jobs.append((remote, local, attrs))
        await _gather_limited(_get(sftp, src, dst, attrs, handler) for src, dst, attrs in jobs)
        for local, attrs in reversed(dirs):
            _set_local_attrs(local, attrs)
    except (OSError, asyncssh.SFTPError) as exc:
        raise FetchError(
            f"copying results back from {rundir} failed: {_reason(exc)}",
            hint=f"the remote directory {rundir} is kept",
        ) from None
    return FetchReport(method="sftp")


async def _get(sftp: asyncssh.SFTPClient, remote: bytes, local: bytes,
               attrs: asyncssh.SFTPAttrs,
               handler: Callable[[bytes, bytes, int, int], None] | None) -> None:
    """Download one file, then give it the remote mode (without setuid/setgid) and times."""
    await sftp.get(remote, local, preserve=False, progress_handler=handler)
    _set_local_attrs(local, attrs)


def _set_local_attrs(local: bytes, attrs: asyncssh.SFTPAttrs) -> None:
    os.chmod(local, (attrs.permissions or 0o755) & localfs.SAFE_MODE_BITS)
    if attrs.mtime is not None:
        os.utime(local, (attrs.atime or attrs.mtime, attrs.mtime))


def _clear_non_dir(local: bytes) -> None:
    """Remove what an earlier attempt left at ``local`` if it is not a directory."""
    if os.path.lexists(local) and (os.path.islink(local) or not os.path.isdir(local)):
        os.unlink(local)


#: rsync options of a fetch: ``-a`` without owner, group, devices and specials (and
#: without ``-r``, added for a whole directory only); links as links (``localfs.place``
#: checks them all); no setuid/setgid bits
RSYNC_FETCH_OPTIONS = ("-lpt", "--no-devices", "--no-specials", "--chmod=ugo-s",
                       "--partial")


async def fetch_rsync(rsh: str, rundir: str, dest: Path, progress: bool,
                      plan: FetchPlan) -> FetchReport:
    """Copy what ``plan`` chose of the run directory (never the control directory) into
    ``dest`` with rsync (:data:`RSYNC_FETCH_OPTIONS`)."""
    args = [*RSYNC_FETCH_OPTIONS, f"--exclude=/{CONTROL_DIR}"]
    listing = None
    if plan.files is None:
        args.append("-r")
    else:  # (listed directories come without their content, which is listed if it comes)
        listing = tempfile.NamedTemporaryFile("wb", prefix="remote-exec-files-", delete=False)
        with listing:
            listing.write(b"".join(os.fsencode(f) + b"\0" for f in plan.files))
        args += ["--from0", f"--files-from={listing.name}"]
        os.makedirs(dest, exist_ok=True)
    try:
        code, err = await rsync_mod.run_rsync(
            rsh, [*args, rsync_mod.rsync_remote(rundir + "/"), str(dest) + "/"],
            progress=progress)
    finally:
        if listing is not None:
            os.unlink(listing.name)
    if code != 0:
        raise FetchError(
            f"rsync could not copy results back from {rundir} (rsync exit {code}): {err[-2000:]}",
            hint=rsync_hint(err, f"the remote directory {rundir} is kept"),
        )
    return FetchReport(method="rsync")


#: from this many entries in a run directory, one remote command (``find`` to list it,
#: ``rm -rf`` to remove it) is used instead of a request per entry over SFTP (0.35-1.6 ms
#: each, CPU-bound in asyncssh: 40,000 removals took 14-24 s, ``rm -rf`` 0.1 s). The
#: break-even is far lower (an exec and its login shell cost some 50 ms: about 100
#: entries); this is a conservative first step that leaves smaller trees as they were
MANY_ENTRIES = 2000

Entries = list[tuple[str, asyncssh.SFTPAttrs]]


async def walk_remote(sftp: asyncssh.SFTPClient, rundir: str,
                      limit: int | None = None) -> Entries | None:
    """Every entry under ``rundir`` (control directory excluded) as (relative path, attrs);
    None as soon as there are more than ``limit`` (then :func:`list_remote` is cheaper)."""
    found: Entries = []
    root = os.fsencode(rundir)
    stack = [b""]
    while stack:
        rel = stack.pop()
        async for entry in sftp.scandir(posixpath.join(root, rel) if rel else root):
            name = os.fsencode(entry.filename)
            if name in (b".", b"..") or (not rel and name == CONTROL_DIR.encode()):
                continue
            child = posixpath.join(rel, name) if rel else name
            found.append((os.fsdecode(child), entry.attrs))
            if limit is not None and len(found) > limit:
                return None
            if entry.attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY:
                stack.append(child)
    return found


# One ``find`` listing a run directory: "TYPE SIZE MTIME MODE PATH" and a NUL per entry,
# the control directory left out (GNU find; elsewhere the SFTP walk does it).
_LIST = ("cd -- \"$1\" && exec find . -mindepth 1 -path ./" + CONTROL_DIR
         + " -prune -o -printf '%y %s %T@ %m %P\\0'")
#: find's %y letter -> (SFTP type, st_mode file type bits)
_FIND_TYPES = {
    "f": (asyncssh.FILEXFER_TYPE_REGULAR, stat.S_IFREG),
    "d": (asyncssh.FILEXFER_TYPE_DIRECTORY, stat.S_IFDIR),
    "l": (asyncssh.FILEXFER_TYPE_SYMLINK, stat.S_IFLNK),
    "p": (asyncssh.FILEXFER_TYPE_FIFO, stat.S_IFIFO),
    "s": (asyncssh.FILEXFER_TYPE_SOCKET, stat.S_IFSOCK),
    "c": (asyncssh.FILEXFER_TYPE_CHAR_DEVICE, stat.S_IFCHR),
    "b": (asyncssh.FILEXFER_TYPE_BLOCK_DEVICE, stat.S_IFBLK),
}


async def list_remote(conn: asyncssh.SSHClientConnection, rundir: str) -> Entries | None:
    """:func:`walk_remote`'s answer from one remote ``find``; None where that does not
    work (no GNU find, a name that is not UTF-8): then walk over SFTP."""
    try:
        result = await shell.run(conn, _LIST, rundir)
    except UnicodeDecodeError:
        return None
    if not result.ok:
        return None
    found: Entries = []
    for record in result.stdout.split("\0"):
        if not record:
            continue
        fields = record.split(" ", 4)
        if len(fields) != 5 or fields[0] not in _FIND_TYPES:
            return None
        kind, size, mtime, mode, rel = fields
        sftp_type, type_bits = _FIND_TYPES[kind]
        try:
            attrs = asyncssh.SFTPAttrs(type=sftp_type, size=int(size),
                                       mtime=int(float(mtime)),
                                       permissions=type_bits | int(mode, 8))
        except ValueError:
            return None
        found.append((rel, attrs))
    return found


async def remove_by_command(conn: asyncssh.SSHClientConnection, path: str) -> bool:
    """``rm -rf -- PATH`` in one exec (it never follows a symlink); False if it failed
    (then the SFTP removal says why)."""
    result = await shell.run_argv(conn, ["rm", "-rf", "--", path])
    return result.ok


#: concurrent file copies over one SFTP channel (each pipelines its own reads/writes)
PARALLEL_FILES = 8


async def _gather_limited(coros: Iterable[Awaitable[None]]) -> None:
    """Await all ``coros``, at most PARALLEL_FILES at a time; the first error propagates."""
    gate = asyncio.Semaphore(PARALLEL_FILES)

    async def one(coro: Awaitable[None]) -> None:
        async with gate:
            await coro

    pending = list(coros)
    tasks = [asyncio.ensure_future(one(c)) for c in pending]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for coro in pending:  # cancelled before their turn: close them, never started
            if inspect.iscoroutine(coro):
                coro.close()


async def _same_remote(sftp: asyncssh.SFTPClient, local: bytes, remote: bytes) -> bool:
    """Whether ``remote`` is already a complete copy of ``local`` (size and mtime)."""
    try:
        attrs = await sftp.stat(remote)
    except asyncssh.SFTPNoSuchFile:
        return False
    st = os.stat(local)
    return attrs.size == st.st_size and attrs.mtime == int(st.st_mtime)


def _same_local(local: bytes, attrs: asyncssh.SFTPAttrs) -> bool:
    """Whether ``local`` is already a complete copy of a remote file with ``attrs``."""
    try:
        st = os.lstat(local)
    except FileNotFoundError:
        return False
    return st.st_size == attrs.size and int(st.st_mtime) == attrs.mtime


def _local_attrs(path: bytes) -> asyncssh.SFTPAttrs:
    st = os.stat(path)
    return asyncssh.SFTPAttrs(permissions=st.st_mode & 0o7777)


async def _restore_dir_times(sftp: asyncssh.SFTPClient, source: bytes, target: bytes) -> None:
    for dirpath, _dirnames, _files in os.walk(source, followlinks=True):
        st = os.stat(dirpath)
        remote = posixpath.normpath(posixpath.join(target, os.path.relpath(dirpath, source)))
        await sftp.utime(remote, (st.st_atime, st.st_mtime))


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


async def rename_over(sftp: asyncssh.SFTPClient, old: str, new: str) -> None:
    """``rename(2)`` over SFTP (replacing ``new``), where the server offers it."""
    try:
        await sftp.posix_rename(old, new)
    except asyncssh.SFTPOpUnsupported:
        with contextlib.suppress(asyncssh.SFTPNoSuchFile):
            await sftp.remove(new)
        await sftp.rename(old, new)


async def write_atomically(sftp: asyncssh.SFTPClient, path: str, data: bytes,
                           mode: int | None = None) -> None:
    """Write remote file ``path`` so that a reader sees all of it or the file before: a
    temporary file beside it, renamed over it (with ``mode``, if given)."""
    tmp = f"{path}.tmp-remote-exec"
    attrs = asyncssh.SFTPAttrs() if mode is None else asyncssh.SFTPAttrs(permissions=mode)
    async with sftp.open(tmp, "wb", attrs) as f:
        await f.write(data)
    if mode is not None:
        await sftp.chmod(tmp, mode)  # (the umask applied to the open)
    await rename_over(sftp, tmp, path)


async def remove_tree(sftp: asyncssh.SFTPClient, path: str) -> None:
    """``rm -rf PATH`` over SFTP (asyncssh's rmtree refuses names with a backslash)."""
    top = os.fsencode(path)
    dirs = [top]
    files: list[bytes] = []
    stack = [top]
    while stack:
        current = stack.pop()
        async for entry in sftp.scandir(current):
            name = os.fsencode(entry.filename)
            if name in (b".", b".."):
                continue
            child = posixpath.join(current, name)
            if entry.attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY:
                dirs.append(child)
                stack.append(child)
            else:
                files.append(child)
    await _gather_limited(sftp.remove(f) for f in files)
    for directory in reversed(dirs):
        await sftp.rmdir(directory)
