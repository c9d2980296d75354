"""Fetching many small files as one tar stream, unpacked locally without trusting it.

The remote ``tar -c`` runs in the run directory over one exec channel and reads the
fetch plan's names from its stdin (NUL-separated, taken verbatim: no name ever passes
through a shell). The stream is unpacked here by :class:`Extractor`, which reads the
headers itself (:func:`_members`: ustar and GNU headers, GNU long names, pax ``path``,
``linkpath``, ``size`` and ``mtime``; a fraction of :mod:`tarfile`'s cost a member) and
trusts nothing in them:

* a member must be named exactly as one of the plan's entries (no absolute name, no
  ``..``, nothing the plan did not ask for, no name twice) and be of the plan's kind:
  a regular file, a directory or a symlink. Hard links, devices, FIFOs and anything
  else are refused, and the whole fetch fails with a :class:`~remote_exec.errors.FetchError`;
* every path is opened component by component from the partial directory with
  ``O_NOFOLLOW`` (``openat``), so nothing is ever written through a symlink, whether
  an earlier attempt or this same stream made it;
* a file is written to a private temporary directory (``.remote-exec`` in the partial
  directory, a name no fetched entry can have: the run directory's control directory
  is never listed) and renamed into place once all its bytes are there, so a cut
  never leaves a half-written file that a retry or ``resume`` takes as complete;
* symlinks are made as symlinks, never followed (:func:`localfs.place` later drops
  those leading out of the destination), and no mode keeps setuid or setgid.

The stream is pulled from the channel as the unpacking thread needs it: memory stays
bounded whatever the number and size of the files. A remote without a usable tar (it
fails having sent nothing) leaves everything as it was, for another method.

``transfer: auto`` takes this for many small files (:func:`transfer.auto_wants_tar`,
``SshBackend._method``), whether both ends have rsync or not: it beats rsync's
receiver there (README *Measured*).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import os
import shutil
import stat
import struct
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import asyncssh

from remote_exec import localfs
from remote_exec.errors import FetchError
from remote_exec.inputs import CONTROL_DIR
from remote_exec.ssh import shell

#: sh: archive the names on stdin (NUL-separated, verbatim: no options, no unquoting,
#: no recursion: the plan lists what it wants) from the run directory ($1) to stdout;
#: hard-linked files are archived whole, each as itself
_TAR_CREATE = ('cd -- "$1" && exec tar -c -f - --format=gnu --null --verbatim-files-from '
               "--no-unquote --no-recursion --hard-dereference -T -")
#: the private directory in the partial directory where files are written before being
#: renamed into place (never the name of a fetched entry: the control directory is not
#: listed)
TMP_NAME = CONTROL_DIR
#: bytes asked of the channel at once. The channel's queue is bounded by its window
#: whatever the read size (:func:`shell.bound_receive_window`, which every channel
#: started by ``shell`` gets; before it, 256 KiB reads let 17 MB pile up at 20,000
#: files, and reads of a whole window were the remedy); 256 KiB keeps the holder's peak
#: at 20,000 files 5 MB lower than 2 MiB reads (76 against 81 MB)
CHUNK = 1 << 18
#: stderr of the remote tar kept for the error message
STDERR_KEEP = 8192
#: a tar block: headers are one, data is padded to whole ones
BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
#: the largest GNU long name or pax header read (they are held whole)
MAX_META = 1 << 20
#: times beyond these (seconds either side of 1970) are refused (os.utime overflows)
_TIME_RANGE = 1 << 40

ProgressFn = Callable[[str, int, int], None]

_DIR = asyncssh.FILEXFER_TYPE_DIRECTORY
_REG = asyncssh.FILEXFER_TYPE_REGULAR
_LNK = asyncssh.FILEXFER_TYPE_SYMLINK
_KIND_WORDS = {_DIR: "a directory", _REG: "a regular file", _LNK: "a symlink"}
_KINDS = {tarfile.REGTYPE: _REG, tarfile.AREGTYPE: _REG, tarfile.DIRTYPE: _DIR,
          tarfile.SYMTYPE: _LNK}
_DATA = (tarfile.REGTYPE, tarfile.AREGTYPE)  # (the types whose size is data that follows)
_MEMBER_WORDS = {
    tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO",
    tarfile.CONTTYPE: "a contiguous file", tarfile.GNUTYPE_SPARSE: "a sparse file",
}
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _umask() -> int:
    """The process's umask, read without changing it (Linux); 0o777 elsewhere (then
    every file's mode is set explicitly)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o777


_UMASK = _umask()


class Refused(Exception):
    """The stream holds what must not be unpacked (the message says what and why)."""


class Aborted(Exception):
    """The fetch was given up while the unpacking thread waited for data."""


def clear_tmp(dest: Path) -> None:
    """Remove what an interrupted tar fetch left in ``dest``'s temporary directory."""
    tmp = os.path.join(dest, TMP_NAME)
    if os.path.lexists(tmp):
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.unlink(tmp)


class ChannelReader:
    """A blocking file object (for :class:`Extractor`, in a thread) over an asyncssh
    stream read by the event loop: one chunk at a time, only as fast as it is consumed."""

    def __init__(self, stream: asyncssh.SSHReader[bytes],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.stream = stream
        self.loop = loop
        self.total = 0
        self.abort = threading.Event()
        self._chunk = b""
        self._at = 0

    def read(self, size: int = -1) -> bytes:
        if self._at >= len(self._chunk):
            self._chunk, self._at = self._fetch(), 0
            if not self._chunk:
                return b""
        if size < 0:
            size = len(self._chunk)
        data = self._chunk[self._at:self._at + size]
        self._at += len(data)
        return data

    def _fetch(self) -> bytes:
        if self.abort.is_set():
            raise Aborted
        future = asyncio.run_coroutine_threadsafe(self.stream.read(CHUNK), self.loop)
        while True:
            try:
                chunk: bytes = future.result(timeout=0.5)
                break
            except concurrent.futures.TimeoutError:
                if self.abort.is_set() or self.loop.is_closed():
                    future.cancel()
                    raise Aborted from None
        self.total += len(chunk)
        return chunk


class Extractor:
    """Unpack a tar stream into ``dest`` (see the module's docstring for the rules);
    ``kinds``: the plan's entries, relative path -> SFTP file type."""

    def __init__(self, dest: Path, kinds: dict[str, int],
                 progress: Callable[[int], None] | None = None) -> None:
        self.dest = os.fsencode(dest)
        self.kinds = kinds
        self.progress = progress
        self.seen: set[str] = set()
        self.dirs: list[tuple[str, int, int]] = []  # (rel, mode, mtime), in stream order
        self.bytes = 0
        self._root = -1
        self._tmp = -1
        self._tmp_count = 0
        self._parent: tuple[str, int] | None = None  # the last parent opened, kept open

    # -- the stream ---------------------------------------------------------------------
    def extract(self, fileobj: Any) -> None:
        """Unpack the whole stream (``fileobj.read(n)`` gives its bytes); raise
        :class:`Refused` at the first member that is not allowed (nothing of it is
        written), :class:`tarfile.ReadError` for a broken stream."""
        self._root = os.open(self.dest, _OPEN_DIR)
        try:
            self._make_tmp()
            stream = _Stream(fileobj)
            for header in _members(stream):
                self._one(stream, header)
            self._finish_dirs()
        finally:
            self._close_parent()
            if self._tmp >= 0:
                os.close(self._tmp)
                with contextlib.suppress(OSError):
                    _rmtree_at(self._root, TMP_NAME)
            os.close(self._root)

    def _one(self, stream: _Stream, header: Header) -> None:
        rel = check_name(header.name)
        kind = header.kind
        got = _KINDS.get(kind)
        if got is None:
            what = _MEMBER_WORDS.get(kind, f"a member of type {kind.decode('latin-1')!r}")
            raise Refused(f"{rel!r} is {what}: only regular files, directories and "
                          "symlinks are fetched")
        wanted = self.kinds.get(rel)
        if wanted is None:
            raise Refused(f"{rel!r} was not asked for")
        if rel in self.seen:
            raise Refused(f"{rel!r} comes twice")
        if got != wanted:
            raise Refused(f"{rel!r} is {_KIND_WORDS[got]} in the stream but "
                          f"{_KIND_WORDS[wanted]} in the listing")
        self.seen.add(rel)
        parent, base = self._open_parent(rel)
        if got == _REG:
            self._write_file(stream, parent, base, header)
        elif got == _DIR:
            self._make_dir(parent, base)
            self.dirs.append((rel, header.mode, header.mtime))
        else:
            if not header.linkname or "\0" in header.linkname:
                raise Refused(f"{rel!r} is a symlink to an empty or NUL-holding target")
            tmp = self._tmp_name()
            os.symlink(os.fsencode(header.linkname), tmp, dir_fd=self._tmp)
            self._rename_in(tmp, parent, base)

    # -- writing, never through a link ----------------------------------------------------
    def _make_tmp(self) -> None:
        try:
            st = os.stat(TMP_NAME, dir_fd=self._root, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:  # (what an interrupted attempt left)
            if stat.S_ISDIR(st.st_mode):
                _rmtree_at(self._root, TMP_NAME)
            else:
                os.unlink(TMP_NAME, dir_fd=self._root)
        os.mkdir(TMP_NAME, 0o700, dir_fd=self._root)
        self._tmp = os.open(TMP_NAME, _OPEN_DIR, dir_fd=self._root)

    def _tmp_name(self) -> bytes:
        self._tmp_count += 1
        return b"%d" % self._tmp_count

    def _write_file(self, stream: _Stream, parent: int, base: bytes, header: Header) -> None:
        tmp = self._tmp_name()
        mode = header.mode & localfs.SAFE_MODE_BITS
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode & 0o777 | 0o600, dir_fd=self._tmp)
        try:
            for block in stream.data(header.size):
                while block:
                    block = block[os.write(fd, block):]
            if mode != (mode | 0o600) & ~_UMASK:  # (what the creation gave it)
                os.fchmod(fd, mode)
            os.utime(fd, (header.mtime, header.mtime))
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self._tmp)
            raise
        os.close(fd)
        self._rename_in(tmp, parent, base)
        self.bytes += header.size
        if self.progress is not None:
            self.progress(self.bytes)

    def _rename_in(self, tmp: bytes, parent: int, base: bytes) -> None:
        """Move ``tmp`` (in the temporary directory) to ``base`` in ``parent``, over what an
        earlier attempt left there (a directory of that name is removed first)."""
        try:
            os.rename(tmp, base, src_dir_fd=self._tmp, dst_dir_fd=parent)
        except OSError as exc:
            if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise
            _rmtree_at(parent, base)  # (rename(2) replaces a file or link, not a directory)
            os.rename(tmp, base, src_dir_fd=self._tmp, dst_dir_fd=parent)

    def _make_dir(self, parent: int, base: bytes) -> None:
        try:
            st = os.stat(base, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            os.unlink(base, dir_fd=parent)  # a file or link an earlier attempt left
            st = None
        if st is None:
            os.mkdir(base, 0o700, dir_fd=parent)
        else:  # (kept from an earlier attempt: writable again until its mode is set)
            fd = os.open(base, _OPEN_DIR, dir_fd=parent)
            try:
                os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)
            finally:
                os.close(fd)

    def _open_parent(self, rel: str) -> tuple[int, bytes]:
        """An open descriptor of ``rel``'s directory (reached without following any link)
        and ``rel``'s last component."""
        head, _, base = rel.rpartition("/")
        if not head:
            return self._root, os.fsencode(base)
        if self._parent is not None and self._parent[0] == head:
            return self._parent[1], os.fsencode(base)
        self._close_parent()
        fd = self._walk(head)
        self._parent = (head, fd)
        return fd, os.fsencode(base)

    def _walk(self, head: str, create: bool = True) -> int:
        """Open directory ``head`` from the root component by component, no link followed;
        raise :class:`Refused` where one is not a directory of the plan, or is a link or
        not a directory on disk."""
        fd = os.dup(self._root)
        done: list[str] = []
        try:
            for part in head.split("/"):
                done.append(part)
                if self.kinds.get("/".join(done)) != _DIR:
                    raise Refused(f"{'/'.join(done)!r} is not a directory in the listing: "
                                  "nothing is written under it")
                try:
                    nxt = os.open(os.fsencode(part), _OPEN_DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(os.fsencode(part), 0o700, dir_fd=fd)
                    nxt = os.open(os.fsencode(part), _OPEN_DIR, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise Refused(f"{'/'.join(done)!r} is not a directory (a symlink or "
                                      "a file): nothing is written through it") from None
                    raise
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _close_parent(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None

    def _finish_dirs(self) -> None:
        """Give directories their modes and times, deepest first (writing into them
        changed their times)."""
        self._close_parent()
        for rel, mode, mtime in reversed(self.dirs):
            fd = self._walk(rel, create=False)
            try:
                os.fchmod(fd, mode & localfs.SAFE_MODE_BITS)
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)

    # -- before the stream: what an earlier attempt already brought ------------------------
    def still_wanted(self, entries: Iterable[tuple[str, asyncssh.SFTPAttrs]]) -> list[str]:
        """The names of ``entries`` to ask for: all but the files an earlier attempt
        already brought complete (same size and mtime, reached without following a
        link). Reads the partial directory: call it in a thread."""
        with os.scandir(self.dest) as listing:
            resuming = any(entry.name != os.fsencode(TMP_NAME) for entry in listing)
        names: list[str] = []
        self._root = os.open(self.dest, _OPEN_DIR)
        try:
            for rel, attrs in entries:
                if not (resuming and attrs.type == _REG and self._complete(rel, attrs)):
                    names.append(rel)
        finally:
            os.close(self._root)
            self._root = -1
        return names

    def _complete(self, rel: str, attrs: asyncssh.SFTPAttrs) -> bool:
        head, _, base = rel.rpartition("/")
        try:
            fd = self._walk(head, create=False) if head else os.dup(self._root)
        except (OSError, Refused):
            return False
        try:
            st = os.stat(os.fsencode(base), dir_fd=fd, follow_symlinks=False)
        except OSError:
            return False
        finally:
            os.close(fd)
        return (stat.S_ISREG(st.st_mode) and st.st_size == attrs.size
                and int(st.st_mtime) == attrs.mtime)


class Header(NamedTuple):
    """What :class:`Extractor` uses of a member's header."""

    name: str
    kind: bytes  # the type flag
    mode: int
    size: int  # bytes of data that follow (padded to whole blocks)
    mtime: int
    linkname: str


class _Stream:
    """The stream's bytes, taken from ``fileobj`` one chunk at a time."""

    def __init__(self, fileobj: Any) -> None:
        self._read = fileobj.read
        self._buf = b""
        self._at = 0

    def _more(self) -> bool:
        chunk = self._read(CHUNK)
        if not chunk:
            return False
        self._buf = self._buf[self._at:] + chunk if self._at < len(self._buf) else chunk
        self._at = 0
        return True

    def block(self) -> bytes | None:
        """The next 512 bytes; None where the stream ends before it."""
        while len(self._buf) - self._at < BLOCK:
            if not self._more():
                if self._at == len(self._buf):
                    return None
                raise tarfile.ReadError("the stream ends within a header")
        at = self._at
        self._at = at + BLOCK
        return self._buf[at:at + BLOCK]

    def data(self, size: int) -> Iterator[bytes | memoryview]:
        """A member's ``size`` bytes of data, in pieces; its padding is skipped after."""
        left = size
        while left:
            have = len(self._buf) - self._at
            if not have:
                if not self._more():
                    raise tarfile.ReadError("unexpected end of data")
                continue
            take = min(have, left)
            at = self._at
            self._at = at + take
            left -= take
            yield (self._buf[at:at + take] if take < 4096
                   else memoryview(self._buf)[at:at + take])
        self.skip(-size % BLOCK)

    def skip(self, size: int) -> None:
        while len(self._buf) - self._at < size:
            size -= len(self._buf) - self._at
            self._at = len(self._buf)
            if not self._more():
                raise tarfile.ReadError("unexpected end of data")
        self._at += size

    def read(self, size: int) -> bytes:
        """A member's data whole (for the GNU and pax extension headers: bounded)."""
        if size > MAX_META:
            raise tarfile.ReadError(f"an extension header of {size} bytes")
        return b"".join(bytes(piece) for piece in self.data(size))


def _members(stream: _Stream) -> Iterator[Header]:
    """The stream's members, GNU long names and pax headers applied, up to the end
    (the first zero block, or the end of the data between members)."""
    first = True
    extra: dict[bytes, bytes] = {}  # path, linkpath, size, mtime: from 'L', 'K' and 'x'
    while True:
        block = stream.block()
        if block is None:
            if first:
                raise tarfile.ReadError("empty stream")
            return
        first = False
        if block == _ZERO_BLOCK:
            return
        _check_sum(block)
        kind = block[156:157]
        size = _number(block[124:136])
        if size < 0:
            raise tarfile.ReadError("a member's size or time is out of range")
        if kind == b"L" or kind == b"K":
            extra[b"path" if kind == b"L" else b"linkpath"] = \
                stream.read(size).split(b"\0", 1)[0]
            continue
        if kind == b"x":
            extra.update(_pax(stream.read(size)))
            continue
        name = extra.get(b"path") or block[:100].split(b"\0", 1)[0]
        if b"path" not in extra and block[257:265] == b"ustar\x0000" and block[345] != 0:
            name = block[345:500].split(b"\0", 1)[0] + b"/" + name
        if kind == b"\0" and name.endswith(b"/"):
            kind = tarfile.DIRTYPE
        if b"size" in extra:
            size = _pax_int(extra[b"size"])
        mtime = _pax_int(extra[b"mtime"]) if b"mtime" in extra else _number(block[136:148])
        if size < 0 or not -_TIME_RANGE < mtime < _TIME_RANGE:
            raise tarfile.ReadError("a member's size or time is out of range")
        link = extra.get(b"linkpath") or block[157:257].split(b"\0", 1)[0]
        if extra:
            extra = {}
        yield Header(name.decode("utf-8", "surrogateescape"), kind,
                     _number(block[100:108]), size if kind in _DATA else 0, mtime,
                     link.decode("utf-8", "surrogateescape"))


def _number(field: bytes) -> int:
    """A header's number: octal text, or GNU's base-256."""
    if field[0] & 0x80:
        if field[0] not in (0x80, 0xFF):
            raise tarfile.ReadError("an invalid number in a header")
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0xFF else value
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise tarfile.ReadError("an invalid number in a header") from None


def _check_sum(block: bytes) -> None:
    stored = _number(block[148:156])
    if stored != sum(block) - sum(block[148:156]) + 256 and \
            stored != sum(struct.unpack_from("148b8x356b", block)) + 256:
        raise tarfile.ReadError("a header's checksum is wrong")


def _pax(data: bytes) -> dict[bytes, bytes]:
    """A pax extended header's records (``LENGTH KEY=VALUE\\n``); sparse files refused."""
    found: dict[bytes, bytes] = {}
    at = 0
    while at < len(data) and data[at] != 0:
        space = data.find(b" ", at)
        try:
            length = int(data[at:space])
        except ValueError:
            raise tarfile.ReadError("a broken pax header") from None
        record = data[space + 1:at + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise tarfile.ReadError("a broken pax header")
        key, value = record[:-1].split(b"=", 1)
        if key.startswith(b"GNU.sparse."):
            raise Refused("a sparse file: only regular files, directories and symlinks "
                          "are fetched")
        if key in (b"path", b"linkpath", b"size", b"mtime"):
            found[key] = value
        at += length
    return found


def _pax_int(value: bytes) -> int:
    try:
        return int(float(value)) if b"." in value else int(value)
    except ValueError:
        raise tarfile.ReadError(f"an invalid number in a pax header: {value!r}") from None


def _rmtree_at(parent: int, name: str | bytes) -> None:
    """``rm -rf`` of directory ``name`` in directory ``parent``, no link followed (as
    ``shutil.rmtree(dir_fd=)`` of Python 3.11 does)."""
    fd = os.open(name, _OPEN_DIR, dir_fd=parent)
    try:
        with os.scandir(fd) as listing:
            entries = list(listing)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                _rmtree_at(fd, entry.name)
            else:
                os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent)


def check_name(name: str) -> str:
    """A member's name as a relative path, or :class:`Refused` (absolute, ``..``, empty)."""
    if not name or "\0" in name:
        raise Refused(f"a member has an empty or NUL-holding name ({name!r})")
    if name.startswith("/"):
        raise Refused(f"{name!r} is an absolute name")
    parts = name.rstrip("/").split("/")
    if ".." in parts:
        raise Refused(f"{name!r} leads out with '..'")
    if any(p in ("", ".") for p in parts):
        raise Refused(f"{name!r} is not a plain relative name")
    return "/".join(parts)


async def fetch_tar(conn: asyncssh.SSHClientConnection, rundir: str, dest: Path,
                    progress: ProgressFn | None,
                    entries: list[tuple[str, asyncssh.SFTPAttrs]]) -> bool:
    """Fetch ``entries`` (a fetch plan's) of ``rundir`` into ``dest`` (a partial
    directory, which may hold an earlier attempt) as one tar stream. False, having
    written nothing, when the remote has no usable tar (then another method does it)."""
    kinds = {rel: attrs.type for rel, attrs in entries}
    probe = Extractor(dest, kinds)
    names = await asyncio.to_thread(probe.still_wanted, entries)
    if not names:
        return True
    started = await shell.start(conn, _TAR_CREATE, rundir, encoding=None)
    process = started.process
    if not started.framed:
        process.close()
        return False
    loop = asyncio.get_running_loop()
    reader = ChannelReader(process.stdout, loop)
    throttle = [0.0]

    def report(done: int) -> None:  # (in the unpacking thread)
        now = time.monotonic()
        if progress is not None and now - throttle[0] > 0.1:
            throttle[0] = now
            loop.call_soon_threadsafe(progress, "tar stream", done, 0)

    extractor = Extractor(dest, kinds, report if progress is not None else None)
    tasks = [asyncio.ensure_future(_send_names(process, names)),
             asyncio.ensure_future(_read_stderr(process))]
    worker = loop.run_in_executor(_executor(), extractor.extract, reader)
    failure: BaseException | None = None
    try:
        try:
            await asyncio.shield(worker)
        except (Refused, tarfile.TarError, Aborted) as exc:
            failure = exc
        if failure is None or reader.total == 0:  # (nothing came: the status says why)
            await asyncio.wait_for(process.wait_closed(), 30)
        else:
            process.close()
        remote_err = (await asyncio.wait_for(tasks[1], 10)).decode("utf-8", "replace")
    except BaseException:
        reader.abort.set()
        process.close()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(worker), 10)
        raise
    finally:
        for task in tasks:
            task.cancel()
    remote_err = remote_err.strip()[-1000:]
    status = process.exit_status
    if progress is not None:
        progress("tar stream", extractor.bytes, 0)
    if (failure is not None or status != 0) and conn.is_closed():
        raise asyncssh.ConnectionLost(f"the connection closed during the tar stream "
                                      f"({failure or 'no exit status'})")
    if reader.total == 0 and status is not None and status != 0:
        return False  # no (working) tar there: it sent nothing, nothing was written
    if isinstance(failure, Refused):
        raise FetchError(f"the tar stream from {rundir} was refused: {failure}; nothing "
                         "of that member was written",
                         hint=f"the remote directory {rundir} is kept: look at what the "
                         "run wrote there (`--transfer sftp` or `rsync` fetches file by file)")
    if failure is not None:
        raise FetchError(f"the tar stream from {rundir} broke off: {failure}"
                         + (f" (remote tar: {remote_err})" if remote_err else ""),
                         hint=f"the remote directory {rundir} is kept")
    if status != 0:
        raise FetchError(f"tar could not archive the results in {rundir} (exit {status}): "
                         f"{remote_err}", hint=f"the remote directory {rundir} is kept")
    missing = [n for n in names if n not in extractor.seen]
    if missing:
        raise FetchError(f"the tar stream from {rundir} lacked {len(missing)} entries "
                         f"(first: {missing[0]!r})",
                         hint=f"the remote directory {rundir} is kept")
    return True


_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that unpack tar streams: their own, so that fetches of many files
    (which wait on their channels) never hold up the default executor's short jobs."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="remote-exec-untar")
    return _EXECUTOR


async def _send_names(process: asyncssh.SSHClientProcess[Any], names: list[str]) -> None:
    """Write the names to the remote tar's stdin (NUL-separated), then EOF; a tar that
    stopped reading (it failed) is left to its exit status."""
    with contextlib.suppress(OSError, asyncssh.Error):
        batch: list[bytes] = []
        for i, name in enumerate(names, 1):
            batch.append(os.fsencode(name) + b"\0")
            if i % 1000 == 0:
                process.stdin.write(b"".join(batch))
                batch = []
                await process.stdin.drain()
        process.stdin.write(b"".join(batch))
        await process.stdin.drain()
        process.stdin.write_eof()


async def _read_stderr(process: asyncssh.SSHClientProcess[Any]) -> bytes:
    """All of the remote tar's stderr, the last :data:`STDERR_KEEP` bytes kept."""
    kept = b""
    with contextlib.suppress(OSError, asyncssh.Error):
        while chunk := await process.stderr.read(CHUNK):
            kept = (kept + chunk)[-STDERR_KEEP:]
    return kept
