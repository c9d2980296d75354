"""The site's content cache: input files the site already holds are not sent again.

(An open SSH site's, reached over SFTP and constant scripts. A restricted site's agent
keeps the same cache itself: ``cache-place`` / ``cache-insert`` / ``cache-trim`` in
``remote-side_scripts/remote_exec_agent.py``, where the layout and the trim policy
used here are defined.)

Layout on the site: ``<root>/.remote-exec-cache/`` (mode 0700, owned by the SSH user,
else it is not used), entries ``<first 2 hex digits>/<sha256>``, read-only (0444);
an entry's modification time is when a run last used it (least recently used entries
go first when the cache is over its size). Temporary files ``.tmp-*`` sit beside the
entries, so that an insertion is one ``rename`` in one directory.

Why a cache entry can never give a run the wrong bytes, or be changed by one:

* **placing is always a copy** (``cp --reflink=auto``: a reflink where the file system
  has them, else a full copy), never a hard link, so a run that writes into its input
  changes its own copy only;
* **every use verifies**: the copy in the run directory is hashed on the site
  (``openssl dgst -sha256``, ``sha256sum`` or ``shasum``) before the entrypoint can see
  it; a copy whose digest is not its name (the entry changed on disk) is removed, the
  entry is evicted and the file is sent as if the site had none;
* **inserting is atomic and checked**: right after staging, before the entrypoint
  starts, the staged input is copied (``cp --reflink=auto``) to a temporary name in
  the entry's directory, hashed, made read-only and renamed over the entry's name. Runs
  inserting the same digest at once rename files of the same content; a run that finds
  an entry mid-eviction fails its copy and sends the file.

No remote command carries a user's text: the scripts below are constants, and their
arguments are the cache's own paths (hex digits) and names in the run's control
directory: the inputs' own names (any bytes, newlines included) are only ever handled
by SFTP, which renames a placed copy into place and points a link at a staged input
for the copy into the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import re
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass

import asyncssh

from remote_exec.agent_file import agent_module
from remote_exec.backends.base import Trimmed
from remote_exec.inputs import CONTROL_DIR, Input
from remote_exec.ssh import shell, transfer
from remote_exec.ui import Reporter

_AGENT = agent_module()
#: the cache's directory under the site's root
CACHE_DIR: str = _AGENT.CACHE_DIR
#: an entry's name
DIGEST_RE: re.Pattern[str] = _AGENT.CACHE_DIGEST_RE
#: names in the run's control directory for copies on their way in or out of the cache
HANDLE_PREFIX = "cache-"
#: files per remote command: each is one exec request, which the login shell gets as one
#: ``-c`` argument (Linux takes at most 128 KiB in one argument; a file costs two or
#: four paths of a few hundred bytes)
BATCH = 100

#: sh: the sha256 of stdin, its first word: OpenSSL's where there is one (it uses the
#: CPU's SHA instructions: 1.0 s per GiB on the machine of the README's *Measured*,
#: where coreutils' ``sha256sum`` takes 4.2 s), else coreutils', else perl's ``shasum``
#: (BSD, macOS)
_DIGEST = ("dg() { if command -v openssl >/dev/null 2>&1; then openssl dgst -sha256 -r; "
           "elif command -v sha256sum >/dev/null 2>&1; then sha256sum; "
           "else shasum -a 256; fi; }; ")
#: sh: copy each entry ($1) to a handle ($2) in the run's control directory and print
#: the copy's digest (or ``-`` when it could not be copied or hashed); a copied entry's
#: time is touched (it was used)
PLACE_SCRIPT = _DIGEST + (
    'while [ $# -ge 2 ]; do '
    'if { cp -f --reflink=auto -- "$1" "$2" || cp -f -- "$1" "$2"; } 2>/dev/null '
    '&& h=$(dg < "$2"); then touch -c -- "$1" 2>/dev/null; echo "${h%% *}"; '
    'else echo -; fi; shift 2; done')
#: sh: copy each staged input (through the link $1) to a temporary name $2, check its
#: digest against $4, make it read-only and rename it to the entry's name $3; print
#: ``ok`` or ``-`` for each
INSERT_SCRIPT = _DIGEST + (
    'while [ $# -ge 4 ]; do '
    'if { cp -f --reflink=auto -- "$1" "$2" || cp -f -- "$1" "$2"; } 2>/dev/null '
    '&& h=$(dg < "$2") && [ "${h%% *}" = "$4" ] && chmod 444 "$2" && mv -f -- "$2" "$3"; '
    'then echo ok; else rm -f -- "$2"; echo -; fi; shift 4; done')


class CacheError(Exception):
    """The cache could not be used for this run (the run goes on without it)."""


@dataclass
class Candidate:
    """A local input file the cache may hold or take."""

    local: str  # absolute local path (symlinks followed when read)
    target: str  # its path in the run directory (normalised)
    size: int
    mode: int
    atime: int
    mtime: int
    digest: str = ""
    mtime_ns: int = 0


def candidates(inputs: Sequence[Input], rundir: str, min_size: int) -> list[Candidate]:
    """The regular files of ``inputs`` (top-level files and files in input directories,
    symlinks followed) of at least ``min_size`` bytes. Walks local trees: call it in a
    thread."""
    found: list[Candidate] = []

    def add(local: str, target: str) -> None:
        st = os.stat(local)
        if stat.S_ISREG(st.st_mode) and st.st_size >= min_size:
            found.append(Candidate(local, posixpath.normpath(target), st.st_size,
                                   st.st_mode & 0o7777, int(st.st_atime), int(st.st_mtime),
                                   mtime_ns=st.st_mtime_ns))

    for item in inputs:
        source = os.path.abspath(item.source)
        top = posixpath.join(rundir, item.name)
        if not item.is_dir:
            add(source, top)
            continue
        for dirpath, _dirnames, filenames in os.walk(source, followlinks=True):
            rel = os.path.relpath(dirpath, source)
            for filename in filenames:
                add(os.path.join(dirpath, filename), posixpath.join(top, rel, filename))
    return found


class SiteCache:
    """The content cache of one site, over a run's connection and SFTP session."""

    def __init__(self, conn: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient,
                 root: str, ui: Reporter) -> None:
        self.conn, self.sftp, self.ui = conn, sftp, ui
        self.dir = posixpath.join(root, CACHE_DIR)

    def entry(self, digest: str) -> str:
        return str(_AGENT.cache_entry(self.dir, digest))

    # -- opening -------------------------------------------------------------------------
    present = False  # whether the cache's directory exists (as :meth:`usable` found it)

    async def usable(self, uid: int | None, create: bool = False) -> str:
        """Why the cache cannot be used ("" when it can, or when it does not exist and
        ``create`` is false: :attr:`present` says which): it must be a directory of the
        SSH user (``uid``) that no one else may enter; ``create`` makes it (0700)."""
        if create:
            with contextlib.suppress(asyncssh.SFTPError):
                await self.sftp.mkdir(self.dir, asyncssh.SFTPAttrs(permissions=0o700))
        try:
            attrs = await self.sftp.lstat(self.dir)
        except asyncssh.SFTPNoSuchFile:
            self.present = False
            return f"{self.dir} could not be created" if create else ""
        self.present = True
        if attrs.type != asyncssh.FILEXFER_TYPE_DIRECTORY:
            return f"{self.dir} is not a directory"
        if uid is not None and attrs.uid != uid:
            return f"{self.dir} belongs to another user (uid {attrs.uid})"
        if (attrs.permissions or 0) & 0o077:
            return (f"{self.dir} is open to other users (mode "
                    f"{oct((attrs.permissions or 0) & 0o777)}); make it 0700")
        return ""

    # -- using it ------------------------------------------------------------------------
    async def lookup(self, wanted: Sequence[Candidate]) -> list[Candidate]:
        """Those of ``wanted`` (digests known) whose entry the cache holds, with the
        same size: pipelined SFTP ``stat``s, one round trip for all of them."""
        if not self.present:
            return []
        digests = sorted({c.digest for c in wanted})

        async def present(digest: str) -> asyncssh.SFTPAttrs | None:
            try:
                return await self.sftp.stat(self.entry(digest))
            except asyncssh.SFTPError:
                return None

        found = dict(zip(digests, await asyncio.gather(*(present(d) for d in digests))))
        return [c for c in wanted if (a := found[c.digest]) is not None
                and a.type == asyncssh.FILEXFER_TYPE_REGULAR and a.size == c.size]

    async def place(self, hits: Sequence[Candidate], rundir: str) -> list[Candidate]:
        """Copy each hit's entry into the run directory and verify the copy's digest on
        the site; the hits placed. A copy that does not match evicts its entry."""
        placed: list[Candidate] = []
        if hits:
            await self._make_parents(hits, rundir)
        for start in range(0, len(hits), BATCH):
            placed += await self._place_batch(hits[start:start + BATCH], rundir, start)
        return placed

    async def _place_batch(self, hits: Sequence[Candidate], rundir: str,
                           first: int) -> list[Candidate]:
        control = posixpath.join(rundir, CONTROL_DIR)
        handles = [posixpath.join(control, f"{HANDLE_PREFIX}{first + i}")
                   for i in range(len(hits))]
        args = [w for hit, handle in zip(hits, handles) for w in (self.entry(hit.digest), handle)]
        result = await shell.run(self.conn, PLACE_SCRIPT, *args)
        answers = result.stdout.splitlines()
        if not result.ok or len(answers) != len(hits):  # (one line per hit, or no trust)
            raise CacheError(f"copying from the cache failed (exit {result.exit_status}, "
                             f"{len(answers)} answers for {len(hits)} files): "
                             f"{result.stderr.strip()[-500:]}")

        async def finish(hit: Candidate, handle: str, answer: str) -> bool:
            try:
                if answer == hit.digest:  # (times and mode first: the rename keeps them)
                    await self.sftp.setstat(handle, asyncssh.SFTPAttrs(
                        permissions=hit.mode, atime=hit.atime, mtime=hit.mtime))
                    await transfer.rename_over(self.sftp, handle, hit.target)
                    return True
                if DIGEST_RE.fullmatch(answer):  # a copy of other bytes: the entry changed
                    self.ui.warn(f"the site's cache entry {self.entry(hit.digest)} no longer "
                                 "holds what its name says: removed, the file is sent")
                    with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                        await self.sftp.remove(self.entry(hit.digest))
            except asyncssh.SFTPConnectionLost:
                raise
            except asyncssh.SFTPError as exc:
                self.ui.warn(f"could not place {hit.target} from the site's cache "
                             f"({exc.reason}): the file is sent")
            with contextlib.suppress(asyncssh.SFTPNoSuchFile, asyncssh.SFTPFailure):
                await self.sftp.remove(handle)
            return False

        done = await asyncio.gather(*(finish(*job) for job in zip(hits, handles, answers)))
        return [hit for hit, ok in zip(hits, done) if ok]

    async def _make_parents(self, hits: Sequence[Candidate], rundir: str) -> None:
        """The directories (inside input directories) the placed files go into."""
        needed: set[str] = set()
        for hit in hits:
            parent = posixpath.dirname(hit.target)
            while parent != rundir and parent.startswith(rundir + "/"):
                needed.add(parent)
                parent = posixpath.dirname(parent)
        for directory in sorted(needed, key=lambda p: p.count("/")):
            with contextlib.suppress(asyncssh.SFTPFailure):  # (it exists: a retry)
                await self.sftp.mkdir(directory)

    async def insert(self, staged: Sequence[Candidate], rundir: str, run_id: str,
                     uid: int | None) -> int:
        """Copy the staged ``staged`` files into the cache (made if need be, for the SSH
        user ``uid``); how many went in."""
        unique = list({c.digest: c for c in staged}.values())
        if not unique:
            return 0
        if not self.present:
            why = await self.usable(uid, create=True)
            if why:
                raise CacheError(why)
        for prefix in sorted({c.digest[:2] for c in unique}):
            with contextlib.suppress(asyncssh.SFTPFailure):
                await self.sftp.mkdir(posixpath.join(self.dir, prefix),
                                      asyncssh.SFTPAttrs(permissions=0o700))
        inserted = 0
        for start in range(0, len(unique), BATCH):
            inserted += await self._insert_batch(unique[start:start + BATCH], rundir, run_id)
        return inserted

    async def _insert_batch(self, items: Sequence[Candidate], rundir: str,
                            run_id: str) -> int:
        control = posixpath.join(rundir, CONTROL_DIR)
        links = [posixpath.join(control, f"{HANDLE_PREFIX}in-{i}") for i in range(len(items))]

        async def link_to(item: Candidate, link: str) -> list[str]:
            with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                await self.sftp.remove(link)  # (an earlier batch's or attempt's)
            await self.sftp.symlink(item.target, link)
            final = self.entry(item.digest)
            tmp = posixpath.join(posixpath.dirname(final),
                                 _AGENT.cache_tmp_name(item.digest, run_id))
            return [link, tmp, final, item.digest]

        try:
            args = await asyncio.gather(*(link_to(*job) for job in zip(items, links)))
            result = await shell.run(self.conn, INSERT_SCRIPT, *(w for a in args for w in a))
        finally:
            for link in links:
                with contextlib.suppress(asyncssh.SFTPNoSuchFile, asyncssh.SFTPFailure):
                    await self.sftp.remove(link)
        return result.stdout.split().count("ok")

    # -- trimming -------------------------------------------------------------------------
    async def entries(self) -> list[tuple[str, int, float]]:
        """Every entry and temporary file as (path, size, mtime)."""
        try:
            top = [e async for e in self.sftp.scandir(self.dir)]
        except asyncssh.SFTPNoSuchFile:
            return []
        subdirs = [posixpath.join(self.dir, str(e.filename)) for e in top
                   if _AGENT.CACHE_PREFIX_RE.fullmatch(str(e.filename))
                   and e.attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY]

        async def listing(directory: str) -> list[tuple[str, int, float]]:
            return [(posixpath.join(directory, str(e.filename)), e.attrs.size or 0,
                     float(e.attrs.mtime or 0)) async for e in self.sftp.scandir(directory)
                    if e.attrs.type == asyncssh.FILEXFER_TYPE_REGULAR]

        return [item for found in await asyncio.gather(*(listing(d) for d in subdirs))
                for item in found]

    async def trim(self, max_size: int, max_age: float, *, dry_run: bool = False,
                   now: float | None = None) -> list[Trimmed]:
        """Remove entries unused for longer than ``max_age`` seconds, then the least
        recently used ones beyond ``max_size`` bytes, and insertions left unfinished for
        a day. What went (or would go, with ``dry_run``)."""
        now = time.time() if now is None else now
        gone = [Trimmed(path, size, why) for path, size, why
                in _AGENT.cache_trim_plan(await self.entries(), max_size, max_age, now)]
        for item in gone:
            if dry_run:
                item.verdict = "would remove"
                continue
            try:
                await self.sftp.remove(item.path)
            except asyncssh.SFTPNoSuchFile:
                pass  # (another run trimmed it)
            except asyncssh.SFTPError as exc:
                item.verdict = "failed"
                self.ui.warn(f"could not remove {item.path}: {exc.reason}")
        return gone
