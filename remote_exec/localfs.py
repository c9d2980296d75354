"""Putting fetched results in place: atomically, and without ever losing or planting
anything on the local side.

Whatever the transfer (SFTP, rsync, a restricted site's agent, object storage), the
results first land in a private partial directory beside the destination. :func:`place`
then makes one local pass over it before anything reaches the destination:

  * only regular files, directories and symlinks are kept; setuid/setgid bits are
    cleared and, when running as root, foreign ownership is taken back;
  * a returned copy of an input that is unchanged (same size and mtime as the local
    input, or the same bytes) is dropped; a changed one is renamed ``NAME.returned``;
  * every symlink is resolved for real, chains and ``..`` included, against the
    destination as it will be once placed; one that leaves it is dropped;
  * each item is then moved into place with one rename. A returned item never replaces
    a local item of another type, nor a local input: it stays in the partial
    directory and :class:`PlacingError` names both paths.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import os
import posixpath
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from remote_exec.errors import FetchError
from remote_exec.inputs import Input

#: The suffix under which an input the entrypoint changed comes back.
RETURNED_SUFFIX = ".returned"
#: Mode bits a placed file or directory may keep: all but setuid and setgid.
SAFE_MODE_BITS = 0o1777
#: Symlinks followed at most while resolving one (as the kernel's ELOOP limit).
MAX_LINK_HOPS = 40
PARTIAL_PREFIX, PARTIAL_SUFFIX = ".remote-exec-", ".partial"

Warn = Callable[[str], None]


class PlacingError(FetchError):
    """Some returned items were kept aside rather than replace local ones (exit 74)."""


def input_files(inputs: Sequence[Input]) -> Iterator[tuple[Path, str]]:
    """Each file of ``inputs`` (directories walked, symlinks followed as rsync -L does)
    and its path in the run directory, in a stable order."""
    for item in inputs:
        if not item.is_dir:
            yield Path(item.source), item.name
            continue
        for root, dirs, names in os.walk(item.source, followlinks=True):
            dirs.sort()
            rel_root = os.path.relpath(root, item.source)
            for name in sorted(names):
                rel = name if rel_root == "." else posixpath.join(*Path(rel_root).parts, name)
                yield Path(root) / name, posixpath.join(item.name, rel)


def partial_dir(into: Path, run_id: str) -> Path:
    """The run's directory beside the destination (same file system: renames are atomic).

    It is named after the run, so a fetch repeated after a dropped connection (or by
    ``resume``) continues into what the earlier attempt brought.
    """
    into.mkdir(parents=True, exist_ok=True)
    partial = partial_path(into, run_id)
    partial.mkdir(mode=0o700, exist_ok=True)
    return partial


def partial_path(into: Path, run_id: str) -> Path:
    """Where :func:`partial_dir` puts the run's partial results (nothing is created)."""
    return into / f"{PARTIAL_PREFIX}{run_id}{PARTIAL_SUFFIX}"


def kind_of(mode: int) -> str:
    """``file``, ``directory``, ``symlink`` or the name of a special file type."""
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


# -- inputs ----------------------------------------------------------------------------------

class StagedInputs:
    """A run's inputs, by the name they were staged under."""

    def __init__(self, inputs: Sequence[Input]) -> None:
        self.by_name = {item.name: item for item in inputs}

    def source(self, rel: str) -> Path | None:
        """The local path whose staged copy is at ``rel`` of the run directory, if any."""
        head, _, rest = rel.partition("/")
        item = self.by_name.get(head)
        if item is None:
            return None
        source = Path(os.path.abspath(item.source))
        if not rest:
            return source
        return source / rest if item.is_dir else None

    def unchanged(self, rel: str, size: int | None, mtime: float | None) -> bool:
        """Whether a returned regular file at ``rel`` of ``size`` bytes, modified at
        ``mtime``, is the staged copy of a local input left as it was (staging keeps
        mtimes; SFTP's have whole seconds)."""
        source = self.source(rel)
        if source is None or size is None or mtime is None:
            return False
        try:
            st = os.stat(source)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == size \
            and int(st.st_mtime) == int(mtime)

    def unchanged_copy(self, rel: str, path: Path) -> bool:
        """Whether the fetched regular file ``path`` (at ``rel`` of the run directory) is
        an input left as it was: by the quick check, or, when the transfer kept no
        times (object storage), by its bytes."""
        st = os.lstat(path)
        if self.unchanged(rel, st.st_size, st.st_mtime):
            return True
        source = self.source(rel)
        try:
            return source is not None and os.stat(source).st_size == st.st_size \
                and filecmp.cmp(source, path, shallow=False)
        except OSError:
            return False

    def is_dir(self, rel: str) -> bool:
        """Whether ``rel`` of the run directory is a directory staged from an input."""
        source = self.source(rel)
        return source is not None and source.is_dir()


# -- the local pass --------------------------------------------------------------------------

def place(partial: Path, into: Path, *, inputs: Sequence[Input] = (),
          warn: Warn | None = None) -> list[str]:
    """Check everything under ``partial`` and move it into ``into``; returns the top-level
    names placed. Raises :class:`PlacingError` when items had to be kept aside.

    Each file is moved with one rename, so a reader of ``into`` sees either the old
    file or the whole new one. Directories are merged, as ``rsync -a`` would.
    """
    say = warn or (lambda _message: None)
    _make_safe(partial, say)
    kept = _settle_inputs(partial, StagedInputs(inputs), say)
    _drop_escaping_links(partial, into, say)
    guard = _InputGuard(inputs)
    names = {item.name for item in inputs}  # (what is left of those is kept aside)
    placed = []
    for name in sorted(set(os.listdir(partial)) - names):
        if _merge(partial / name, into / name, guard, kept):
            placed.append(name)
    if kept:
        raise PlacingError(
            f"{len(kept)} returned item(s) could not be placed and were kept aside (the "
            "rest is in place):\n  " + "\n  ".join(kept),
            hint=f"the local items were left as they were and the returned ones wait in "
            f"{partial}: move the local ones away and run `remote-exec resume "
            f"{_run_id_of(partial)}`, or take the returned ones from there (the remote "
            "directory is kept)")
    shutil.rmtree(partial, ignore_errors=True)
    return placed


def discard(partial: Path) -> None:
    shutil.rmtree(partial, ignore_errors=True)


def tree_size(path: Path) -> int:
    """Total bytes of the regular files under ``path`` (links not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


#: errno values and rsync's words for a local file system without room
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_WORDS = ("No space left on device", "Disk quota exceeded")


def out_of_space(exc: BaseException | None) -> bool:
    """Whether ``exc`` or what caused it is a file system running out of space."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
            return True
        if any(words in str(exc) for words in _NO_SPACE_WORDS):  # rsync's message
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def out_of_space_error(partial: Path, run_id: str, remote: str,
                       total: int | None) -> FetchError:
    """The local disk filled up while fetching into ``partial``: say where things are and
    that ``remote-exec resume`` continues the fetch into the same partial directory."""
    free = shutil.disk_usage(partial).free
    need = ""
    if total is not None:
        missing = max(total - tree_size(partial), 0)
        need = f": {missing} more bytes needed, {free} free"
    return FetchError(
        f"fetching the results failed: the local file system of {partial.parent} is full"
        f"{need}. What was fetched is kept in {partial}; the results are still on the "
        f"remote host ({remote})",
        hint=f"free space there, then `remote-exec resume {run_id[:8]}` continues the fetch "
        f"into {partial} (or delete that directory to give the results up)",
    )


def unwritable_error(into: Path, exc: OSError, run_id: str, remote: str) -> FetchError:
    """The results cannot be written into ``into`` (not a directory, no permission...)."""
    what = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
    return FetchError(
        f"cannot put the results into {into} ({what}); the results are still on the "
        f"remote host ({remote})",
        hint=f"make {into} a writable directory, then `remote-exec resume {run_id[:8]}` "
        "fetches them",
    )


def _make_safe(partial: Path, say: Warn) -> None:
    """Remove special files, clear setuid/setgid bits, take back foreign ownership."""
    root = os.geteuid() == 0
    for dirpath, dirnames, filenames in os.walk(partial):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            what = kind_of(st.st_mode)
            if what not in ("file", "directory", "symlink"):
                os.unlink(path)
                say(f"not fetched: {os.path.relpath(path, partial)} (a {what}: only files, "
                    "directories and symlinks come back)")
                continue
            if root and (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                os.lchown(path, os.geteuid(), os.getegid())
            if what != "symlink" and st.st_mode & ~SAFE_MODE_BITS & 0o7777:
                os.chmod(path, stat.S_IMODE(st.st_mode) & SAFE_MODE_BITS)
                say(f"not fetched: the setuid/setgid bit of {os.path.relpath(path, partial)} "
                    "(cleared)")


def _settle_inputs(partial: Path, inputs: StagedInputs, say: Warn) -> list[str]:
    """Drop unchanged copies of inputs; rename what is left of an input ``NAME.returned``.
    Returns why the copies that could not be renamed were kept aside."""
    kept: list[str] = []
    for item in inputs.by_name.values():
        top = partial / item.name
        if not os.path.lexists(top):
            continue
        _drop_unchanged(partial, top, inputs)
        if not os.path.lexists(top):
            continue
        renamed = partial / (item.name + RETURNED_SUFFIX)
        if _merge(top, renamed, _InputGuard(()), []) and not os.path.lexists(top):
            say(f"input {item.name} was changed by the entrypoint: its returned copy is "
                f"placed as {renamed.name}; the local input is untouched")
        else:  # the entrypoint also returned NAME.returned, of another type
            kept.append(f"{top} (the changed input {item.name}) cannot become {renamed.name}, "
                        "which the entrypoint returned too")
    return kept


def _drop_unchanged(partial: Path, top: Path, inputs: StagedInputs) -> None:
    paths = [top]
    if top.is_dir() and not top.is_symlink():
        paths = [Path(d, n) for d, dirs, files in os.walk(top, topdown=False)
                 for n in files + dirs] + [top]
    for path in paths:
        rel = path.relative_to(partial).as_posix()
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and inputs.unchanged_copy(rel, path):
            os.unlink(path)
        elif stat.S_ISDIR(st.st_mode) and not os.listdir(path) and inputs.is_dir(rel):
            os.rmdir(path)


# -- symlinks --------------------------------------------------------------------------------

def _drop_escaping_links(partial: Path, into: Path, say: Warn) -> None:
    """Drop every symlink under ``partial`` that, resolved against the destination as it
    will be once placed, leads out of ``into``; again until none does (dropping one
    may change where another leads)."""
    view = _PlacedView(partial, into)
    changed = True
    while changed:
        changed = False
        for link in _links(partial):
            rel = link.relative_to(partial).as_posix()
            why = view.escapes(rel)
            if why:
                target = os.readlink(link)
                link.unlink()
                say(f"not fetched: {rel} -> {target} (symlink {why})")
                changed = True


def _links(top: Path) -> list[Path]:
    """The symlinks under ``top``, in :func:`os.walk`'s order (its directories, then the
    rest, each directory before what it holds), told by the directory entries' types:
    no ``lstat`` an entry."""
    found: list[Path] = []

    def walk(path: str) -> None:
        try:
            with os.scandir(path) as listing:
                entries = list(listing)
        except OSError:  # (as os.walk: what cannot be listed is passed over)
            return
        dirs = [e for e in entries if e.is_dir()]
        found.extend(Path(e.path) for e in dirs + [e for e in entries if not e.is_dir()]
                     if e.is_symlink())
        for entry in dirs:
            if not entry.is_symlink():
                walk(entry.path)

    walk(str(top))
    return found


class _PlacedView:
    """The destination as it will look once ``partial`` is placed into ``into``.

    A returned item wins over a local one of the same type (directories merge); a
    local one of another type stays (the returned one is kept aside).
    """

    def __init__(self, partial: Path, into: Path) -> None:
        self.roots = (str(partial), str(into))

    def escapes(self, rel: str) -> str:
        """Why the link at ``rel`` leads outside the destination ('' if it does not)."""
        parts = rel.split("/")
        resolved = parts[:-1]  # where the resolution is, relative to the destination
        layers = self._layers(resolved)
        pending = [parts[-1]]
        hops = 0
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if not resolved:
                    return "leading out of the destination"
                resolved.pop()
                layers = self._layers(resolved)
                continue
            link, below = self._lookup(layers, part)
            if link is None:  # a directory (go on inside), or lexically beyond it
                resolved.append(part)
                layers = below
                continue
            hops += 1
            if hops > MAX_LINK_HOPS:
                return "in a loop of symlinks"
            target = os.readlink(link)
            if os.path.isabs(target):
                return "leading to an absolute path"
            pending[:0] = target.split("/")
        return ""

    def _layers(self, parts: list[str]) -> list[str]:
        """The real directories (partial and/or destination) that ``parts`` names."""
        layers = list(self.roots)
        for part in parts:  # (each one a directory or nothing: links were followed)
            _link, layers = self._lookup(layers, part)
        return layers

    def _lookup(self, layers: list[str], part: str) -> tuple[str | None, list[str]]:
        """``part`` under the directories ``layers``: (the symlink that it is, or None;
        the directories it names when it is one)."""
        found: list[tuple[str, str]] = []  # (kind, path) in layer order: partial first
        for layer in layers:
            path = os.path.join(layer, part)
            with contextlib.suppress(OSError):
                found.append((kind_of(os.lstat(path).st_mode), path))
        if not found:
            return None, []
        winner = found[0] if len(found) == 1 or found[0][0] == found[-1][0] else found[-1]
        if winner[0] == "symlink":
            return winner[1], []
        if winner[0] == "directory":
            return None, [path for kind, path in found if kind == "directory"]
        return None, []


# -- moving into place -----------------------------------------------------------------------

class _InputGuard:
    """The local paths of the inputs: never written to, whatever comes back."""

    def __init__(self, inputs: Sequence[Input]) -> None:
        self.exact: set[str] = set()
        self.trees: list[str] = []
        for item in inputs:
            source = os.path.abspath(item.source)
            self.exact.update({_canonical(source), os.path.realpath(source)})
            if item.is_dir:
                self.trees.append(os.path.realpath(source).rstrip("/") + "/")

    def refuses(self, path: Path) -> str:
        """Why nothing may be placed at ``path`` ('' if it may)."""
        canonical = _canonical(str(path))
        if canonical in self.exact:
            return f"would overwrite the local input {path}"
        if canonical.startswith(tuple(self.trees)):
            return f"would land inside a local input directory, at {path}"
        return ""


def _canonical(path: str) -> str:
    """``path`` with its directory resolved but not its last component."""
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(head), tail)


def _merge(src: Path, dst: Path, guard: _InputGuard, kept: list[str]) -> bool:
    """Move ``src`` to ``dst`` (merging directories); what cannot go is left in place and
    described in ``kept``. Whether anything of ``src`` was placed."""
    what = kind_of(os.lstat(src).st_mode)
    refused = guard.refuses(dst)
    if refused:
        kept.append(f"{src} (a {what}) {refused}")
        return False
    try:
        there = kind_of(os.lstat(dst).st_mode)
    except FileNotFoundError:
        os.replace(src, dst)
        return True
    if there != what:
        kept.append(f"{src} (a {what}) would replace the local {there} {dst}")
        return False
    if what != "directory":
        os.replace(src, dst)
        return True
    merged = [_merge(src / name, dst / name, guard, kept) for name in sorted(os.listdir(src))]
    if not os.listdir(src):
        shutil.copystat(src, dst, follow_symlinks=False)
        os.rmdir(src)
        return True
    return any(merged)


def _run_id_of(partial: Path) -> str:
    return partial.name.removeprefix(PARTIAL_PREFIX).removesuffix(PARTIAL_SUFFIX)[:8]
