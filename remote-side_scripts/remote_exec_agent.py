#!/usr/bin/env python3
"""remote-exec agent: the only thing an orchestrator's SSH key may run on this host.

The site administrator installs this file (standard library only, Python >= 3.6) and
makes it the forced command of the key the orchestrator uses::

    command="/usr/bin/python3 /home/u/.remote-exec-agent/remote_exec_agent.py
    --allowlist /home/u/.remote-exec-agent/allowlist.json",restrict ssh-ed25519 AAAA...

sshd then runs it for every session of that key (exec, shell and subsystem requests
alike) with the client's request in ``SSH_ORIGINAL_COMMAND``. The agent runs only its
own commands and refuses everything else (one line on stderr, exit status 2)::

    hello                           what this host offers (JSON)
    create RUN_ID                   make the run directory <root>/RUN_ID
    status RUN_ID                   where a run stands (JSON)
    launch RUN_ID ENTRYPOINT        run an allowlisted entrypoint once, detached;
                                    parameters as a JSON object on stdin
    launch RUN_ID ENTRYPOINT --batch
                                    the same checks and records, but prepare the run
                                    for a batch job instead of starting it: prints
                                    the job's command (see "Batch jobs" below)
    wait RUN_ID                     block until the run has an exit code
    log RUN_ID [--offset N] [--follow]
                                    the run's output, raw bytes
    cancel RUN_ID [GRACE_SECONDS]   TERM the run's process group, KILL after GRACE
                                    (a batch run: its job does, on its own node)
    remove RUN_ID                   delete a run that is not running
    list                            all runs (JSON)
    token                           a Slurm REST token: the output of the allowlist's
                                    ``token_command`` (never logged)
    cache-place RUN_ID              copy the inputs the site's content cache holds into
                                    the run directory (files listed as JSON on stdin)
    cache-insert RUN_ID             after staging: add the run's new inputs to the cache
                                    and trim it (JSON on stdin)
    cache-trim                      trim the content cache (JSON on stdin; ``cleanup``)
    rsync --server ...              rsync's server side, confined to one run directory:
                                    inputs go in before launch; results come back
                                    through the return filter only

The allowlist (JSON, owned by the administrator) names the run root, the agent's own
state directory (which no client can write), the agent log, the entrypoints (each
pinned by its sha256 and declaring typed parameters, as remote-exec templates do) and
which result files may come back, and the content cache's limits (``cache``: false
turns it off; ``{"max_size": BYTES, "max_age": SECONDS}`` caps what clients ask).
Parameters reach an entrypoint as environment variables ``RE_<name>``; the agent never
builds shell text from what a client sends and never runs a shell of its own. An
entrypoint runs from where the administrator installed it (it may use files beside
it), after its sha256 was checked twice: when the launch is accepted and again right
before it starts; the approved bytes are kept with the run in
``<state>/<RUN_ID>/entrypoint``.

Batch jobs (a site whose runs go through Slurm's REST API, the run directory on a file
system the compute nodes share): ``launch RUN_ID ENTRYPOINT --batch`` checks and records
the launch as ``launch`` does, writes ``<state>/<RUN_ID>/batch.json`` (the entrypoint
and the variables the agent adds for it) and prints ``{"prepared": true, "job_command":
[PYTHON, AGENT, "--allowlist", ALLOWLIST, "--batch-job", RUN_ID], "job_output": PATH}``
(where the scheduler is to write the job's own output: the run's state, beside the
agent's other records of it). The client submits a job whose script is ``exec`` of that
command; on the compute node the agent (``--batch-job``, an option of the command line
that no SSH request can reach) starts the entrypoint once, after checking its sha256
again, and stops it (TERM to its process group, KILL after the grace) when the run is
cancelled or the job gets TERM, INT or HUP (``scancel``). It records ``job_id``,
``job_host``, ``started_at`` and the exit code as a launch does, never a ``pgid`` (the
login host must never signal a process of a compute node), and exits with the
entrypoint's exit code. ``cancel`` on a batch run only marks it cancelled (after writing
the grace it was given into ``cancel_grace``, which the job uses) and waits GRACE + 3
seconds for the job to record an exit code.

Exit status: 0 ok, 1 failure, 2 refused, 3 a run was lost (``wait``), 96 the run was
already launched; ``launch`` itself exits with the entrypoint's exit code.

Importing this module has no side effects, and remote-exec itself imports it: this file
is the one definition of what both sides must decide alike. The return filter
(``match_pattern``, ``is_returned``, ``build_outbox``, ``check_pattern``), the rules of
typed parameters (``Parameter``, ``bind_parameters``) and the protocol's constants (the
exit codes, the control files ``launched`` / ``cancelled`` / ``pgid`` / ``exit_code``,
``LOG_NAME``, ``MARK_WORD``) are used by the orchestrator as they are written here.
"""

import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import posixpath
import pwd
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
import traceback

AGENT_VERSION = "2"
AGENT_NAME = "remote-exec-agent"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_REFUSED = 2
EXIT_LOST = 3
EXIT_ALREADY_LAUNCHED = 96
#: the exit code recorded for a run stopped by TERM or cancelled before it started
#: (128 + SIGTERM), and for one that had to be KILLed (128 + SIGKILL)
EXIT_TERMINATED = 143
EXIT_KILLED = 137

#: a run's control files (remote-exec's own control scripts name them the same):
#: ``launched`` is the launch-once guard, a directory (``mkdir`` succeeds only once,
#: and a cancel takes it too so that a run not launched yet never will be);
#: ``cancelled`` the cancel mark; ``pgid`` the run's process group; ``exit_code`` the
#: entrypoint's exit code, written atomically (a temporary file renamed into place)
LAUNCHED = "launched"
CANCELLED = "cancelled"
PGID_FILE = "pgid"
EXIT_CODE_FILE = "exit_code"
#: (the agent's own, in the run's state directory) the run's files when it was launched
STAGED_FILE = "staged.json"
#: (the agent's own) a run prepared for a batch job: ``{"entrypoint", "env"}``; the
#: job's once-only guard (a directory, refreshed while the job runs); the Slurm job id
#: and host the job recorded; the grace a ``cancel`` asked for (seconds); the
#: scheduler's own output of the job
BATCH_FILE = "batch.json"
JOB_STARTED = "job_started"
JOB_ID_FILE = "job_id"
JOB_HOST_FILE = "job_host"
CANCEL_GRACE_FILE = "cancel_grace"
JOB_OUTPUT_FILE = "job.out"

#: the entrypoint's output, inside the run directory (as remote-exec's own flow names it)
LOG_NAME = "remote_program_exec.log"
RUN_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
ENTRYPOINT_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
COMMAND_LIST = ("hello, create, status, launch, wait, log, cancel, remove, list, token, "
                "cache-place, cache-insert, cache-trim, rsync --server")
ONLY_AGENT = "this key runs only the remote-exec agent (commands: %s)" % COMMAND_LIST
SFTP_REFUSAL = ("SFTP is not available through the remote-exec agent; files move with "
                "rsync confined to one run directory")
#: how every line the agent writes to stderr begins (the client recognises its refusals
#: by it)
SAY_PREFIX = "remote-exec agent: "
RSYNC_MISSING = "rsync is not installed on this host; ask the site administrator to install it"

#: what comes back of a run by default: everything in its run directory
RETURN_ALL = ["**"]

#: parameter declarations, as remote-exec templates have them
TYPES = ("string", "int", "float", "bool", "choice", "path", "file", "list")
ITEM_TYPES = tuple(t for t in TYPES if t != "list")
PARAMETER_KEYS = frozenset(["type", "items", "required", "default", "pattern", "choices",
                            "min", "max", "description"])
ENTRYPOINT_KEYS = frozenset(["path", "sha256", "interpreter", "parameters", "returns",
                             "description"])
ALLOWLIST_KEYS = frozenset(["version", "root", "state", "log", "entrypoints", "returns",
                            "cache", "token_command"])
#: what ``hello`` says this agent can do beyond version 2's requests (a client tells an
#: older agent by their absence)
FEATURES = ["batch", "token"]
_TRUE = frozenset(["1", "true", "yes", "on"])
_FALSE = frozenset(["0", "false", "no", "off"])

#: rsync short options a client may give (``L`` only when it sends to us)
RSYNC_SHORT = frozenset("logDtprcCSHAXUNOJWxnuvzbkmIRd")
RSYNC_LONG = frozenset([
    "--partial", "--safe-links", "--munge-links", "--numeric-ids", "--inplace", "--append",
    "--append-verify", "--delete", "--delete-before", "--delete-during", "--delete-after",
    "--delete-delay", "--ignore-errors", "--size-only", "--ignore-times", "--no-implied-dirs",
])
RSYNC_LONG_VALUE = {
    "--timeout": re.compile(r"[0-9]+"),
    "--compress-level": re.compile(r"[0-9]+"),
    "--checksum-seed": re.compile(r"[0-9]+"),
    "--bwlimit": re.compile(r"[0-9]+"),
    "--max-size": re.compile(r"[0-9]+[kKmMgG]?"),
    "--min-size": re.compile(r"[0-9]+[kKmMgG]?"),
}
RSYNC_CAPABILITIES_RE = re.compile(r"[.A-Za-z0-9]*")

POLL_SECONDS = 0.2
LOG_POLL_SECONDS = 0.25
#: how long a cancel waits for a launch under way to record its process group
PGID_WAIT_SECONDS = 5.0
#: seconds between TERM and KILL when a cancel does not say
DEFAULT_CANCEL_GRACE = 10
#: a batch job refreshes its ``job_started`` guard this often (seconds); a guard older
#: than BATCH_STALE_SECONDS without an exit code is a job that is gone
BATCH_HEARTBEAT_SECONDS = 5.0
BATCH_STALE_SECONDS = 60.0
#: extra seconds a ``cancel`` of a batch run waits for its job, beyond the grace
BATCH_CANCEL_SLACK = 3
#: the token command's time limit (seconds) and the number of words it may have
TOKEN_TIMEOUT = 30
MAX_TOKEN_COMMAND_WORDS = 16
FETCH_LOCK_SECONDS = 30.0
MAX_PARAMETERS_BYTES = 1024 * 1024

#: the site's content cache (remote-exec's open SSH sites keep the same one, laid out
#: alike): ``<root>/CACHE_DIR/<first 2 hex digits>/<sha256>``, the directory 0700, the
#: entries 0444; an entry's modification time is when a run last used it. Insertions
#: are written to ``CACHE_TMP_PREFIX...`` beside the entry and renamed into place.
CACHE_DIR = ".remote-exec-cache"
CACHE_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
CACHE_PREFIX_RE = re.compile(r"[0-9a-f]{2}")
CACHE_TMP_PREFIX = ".tmp-"
#: unfinished insertions older than this (seconds) are debris
CACHE_TMP_MAX_AGE = 86400.0
#: the allowlist's ``cache`` object
CACHE_KEYS = frozenset(["max_size", "max_age"])
#: the largest cache request on stdin (a file costs about 200 bytes of JSON)
MAX_CACHE_REQUEST_BYTES = 32 * 1024 * 1024
#: bytes copied or hashed at once
CACHE_CHUNK = 1024 * 1024
#: Linux's ioctl that makes a reflink (a copy sharing the blocks until one side writes)
FICLONE = 0x40049409


class Refused(Exception):
    """A request that policy forbids or that is malformed (exit status 2).

    ``logged`` is what the agent log gets instead of the message when the message
    quotes a parameter value (values are never logged).
    """

    #: what kind of refusal (the pull protocol's ``reason``); None for others
    kind = None

    def __init__(self, message, logged=None):
        Exception.__init__(self, message)
        self.logged = logged if logged is not None else message


class EntrypointNotAllowed(Refused):
    """An entrypoint the allowlist does not name."""

    kind = "entrypoint_not_allowed"


class DigestMismatch(Refused):
    """An allowlisted entrypoint whose file no longer has its pinned sha256."""

    kind = "digest_mismatch"


class BadValue(Refused):
    """A parameter value its rules refuse. ``reason`` says why without naming the
    parameter; unlike ``logged``, it may quote the value."""

    def __init__(self, parameter, reason, logged_reason=None):
        where = "parameter %r: " % (parameter,)
        Refused.__init__(self, where + reason,
                         where + (reason if logged_reason is None else logged_reason))
        self.parameter = parameter
        self.reason = reason


class MissingParameter(Refused):
    """A required parameter was not given (``parameter`` names it)."""

    def __init__(self, message, parameter):
        Refused.__init__(self, message)
        self.parameter = parameter


class Failure(Exception):
    """Something broke (exit status 1)."""


class AlreadyLaunched(Exception):
    """The run's launch guard was taken before (exit status 96)."""


# --------------------------------------------------------------------------------------
# Return filter (also used by the orchestrator)
# --------------------------------------------------------------------------------------

def _segments(path):
    return [s for s in path.split("/") if s not in ("", ".")]


def match_pattern(pattern, relpath):
    """Whether glob ``pattern`` matches ``relpath`` (both ``/``-separated, relative).

    ``**`` matches zero or more whole segments; any other segment matches exactly one
    segment with ``fnmatch.fnmatchcase`` (so ``*`` never crosses ``/``). A trailing
    ``/`` in the pattern is ignored. A pattern matching a parent directory of
    ``relpath`` matches ``relpath`` too (``secret`` covers ``secret/x/y``).
    """
    pats = pattern.rstrip("/").split("/")
    if pats == [""]:
        return False
    segs = _segments(relpath)
    n = len(segs)
    # row[j]: whether the patterns so far match exactly segs[:j]
    row = [True] + [False] * n
    for pat in pats:
        new = [False] * (n + 1)
        if pat == "**":
            for j in range(n + 1):
                new[j] = row[j] or (j > 0 and new[j - 1])
        else:
            for j in range(1, n + 1):
                new[j] = row[j - 1] and fnmatch.fnmatchcase(segs[j - 1], pat)
        row = new
    if n == 0:
        return row[0]
    return any(row[1:])


def is_returned(relpath, returns, never, only):
    """Whether ``relpath`` (relative to the run directory) may come back to the client."""
    if not any(match_pattern(p, relpath) for p in returns):
        return False
    if only and not any(match_pattern(p, relpath) for p in only):
        return False
    return not any(match_pattern(p, relpath) for p in (never or ()))


def _within(path, parent):
    """Whether ``path`` is ``parent`` or below it (both already absolute and real)."""
    if parent == "/":
        return True
    return path == parent or path.startswith(parent + "/")


def _link_stays_inside(relpath, target):
    """Whether a symlink at ``relpath`` pointing to ``target`` stays in its tree (lexically)."""
    if not target or target.startswith("/"):
        return False
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(relpath), target))
    return resolved != ".." and not resolved.startswith("../") and not resolved.startswith("/")


def _rmtree(path):
    """Remove a tree (never following symlinks), making read-only directories writable."""
    retried = set()

    def retry(func, failed, exc):
        if failed in retried or func not in (os.unlink, os.remove, os.rmdir, os.open,
                                             os.scandir, os.listdir, os.lstat):
            raise exc
        retried.add(failed)
        try:
            os.chmod(os.path.dirname(failed), stat.S_IRWXU)
            if func in (os.unlink, os.remove, os.rmdir, os.lstat):
                if func is os.lstat:
                    return
                func(failed)
            else:  # a directory that could not be opened or listed
                os.chmod(failed, stat.S_IRWXU)
                shutil.rmtree(failed, **handler)
        except OSError:
            raise exc from None

    def onerror(func, failed, exc_info):
        retry(func, failed, exc_info[1])

    # Python 3.12 deprecates onerror for onexc (same handler, the exception itself)
    if sys.version_info >= (3, 12):
        handler = {"onexc": retry}
    else:
        handler = {"onerror": onerror}
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path, **handler)


def build_outbox(rundir, outbox, returns, never, only, staged=None):
    """Fill ``outbox`` with what of ``rundir`` may come back, and say what was left out.

    Regular files whose relative path ``is_returned`` are hard-linked (copied when that
    fails); a returned symlink is recreated only when it is relative and stays inside
    the run directory, both lexically and once resolved in the outbox; other file
    types never come back. A directory appears when something in it comes back, or
    when it matches and is empty. ``outbox`` is removed first if it exists.
    ``staged`` (see :func:`staged_files`): the inputs as the launch found them; one
    still exactly so (same inode, size, times: never written since) does not come back.
    Returns ``{"files": n, "links": n, "bytes": total, "skipped": [relpaths]}`` (and
    ``"unchanged": n`` with ``staged``).
    """
    never = list(never or ())
    only = list(only or ())
    if os.path.lexists(outbox):
        _rmtree(outbox)
    os.mkdir(outbox, 0o700)
    report = {"files": 0, "links": 0, "bytes": 0, "skipped": []}
    if staged is not None:
        report["unchanged"] = 0
    skipped = report["skipped"]
    made = {"": rundir}  # relpath of every outbox directory -> its source directory
    links = []

    def ensure_dir(rel):
        if rel in made:
            return
        ensure_dir(posixpath.dirname(rel))
        os.mkdir(os.path.join(outbox, rel), 0o700)
        made[rel] = os.path.join(rundir, rel)

    def unreadable(exc):
        rel = os.path.relpath(exc.filename or rundir, rundir)
        skipped.append(rel if rel != "." else "")

    for top, dirnames, filenames in os.walk(rundir, onerror=unreadable):
        reltop = os.path.relpath(top, rundir)
        reltop = "" if reltop == "." else reltop.replace(os.sep, "/")
        subdirs = []
        for name in sorted(dirnames + filenames):
            rel = posixpath.join(reltop, name) if reltop else name
            src = os.path.join(top, name)
            dst = os.path.join(outbox, rel)
            try:
                st = os.lstat(src)
            except OSError:
                skipped.append(rel)
                continue
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(name)
                if is_returned(rel, returns, never, only):
                    try:
                        empty = not os.listdir(src)
                    except OSError:
                        empty = False
                    if empty:
                        ensure_dir(rel)
                continue
            if not is_returned(rel, returns, never, only):
                skipped.append(rel)
                continue
            if stat.S_ISREG(st.st_mode):
                if staged is not None and staged.get(rel) == _file_key(st):
                    report["unchanged"] += 1  # (the client has it: an input)
                    continue
                ensure_dir(reltop)
                try:
                    os.link(src, dst, follow_symlinks=False)
                except (OSError, NotImplementedError):
                    shutil.copy2(src, dst, follow_symlinks=False)
                # the run may have swapped the file for something else meanwhile
                now = os.lstat(dst)
                if not stat.S_ISREG(now.st_mode):
                    os.unlink(dst)
                    skipped.append(rel)
                    continue
                report["files"] += 1
                report["bytes"] += now.st_size
            elif stat.S_ISLNK(st.st_mode):
                try:
                    target = os.readlink(src)
                except OSError:
                    skipped.append(rel)
                    continue
                if not _link_stays_inside(rel, target):
                    skipped.append(rel)
                    continue
                ensure_dir(reltop)
                os.symlink(target, dst)
                links.append(rel)
            else:
                skipped.append(rel)
        dirnames[:] = [d for d in dirnames if d in subdirs]

    # A lexical check can be fooled by links through links (``a -> .``, ``b -> a/a/..``):
    # resolve every recreated link for real, in the outbox as it will be served.
    real_outbox = os.path.realpath(outbox)
    changed = True
    while changed:
        changed = False
        for rel in list(links):
            path = os.path.join(outbox, rel)
            if not _within(os.path.realpath(path), real_outbox):
                os.unlink(path)
                links.remove(rel)
                skipped.append(rel)
                changed = True
    report["links"] = len(links)

    # directories keep their modes (owner rwx kept, so the outbox stays removable) and times
    for rel in sorted(made, key=lambda r: r.count("/") + (1 if r else 0), reverse=True):
        try:
            st = os.lstat(made[rel])
            dst = os.path.join(outbox, rel) if rel else outbox
            os.chmod(dst, (st.st_mode & 0o7777) | stat.S_IRWXU)
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        except OSError:
            pass
    skipped.sort()
    return report


def _file_key(st):
    """What changes whenever a file is written or replaced (the inode change time moves
    with every write, rename or chmod)."""
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def staged_files(rundir):
    """``{relpath: key}`` of the regular files in ``rundir``: the inputs, as the launch
    finds them (see :func:`build_outbox`)."""
    found = {}
    for top, _dirnames, filenames in os.walk(rundir):
        for name in filenames:
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found[os.path.relpath(path, rundir).replace(os.sep, "/")] = _file_key(st)
    return found


# --------------------------------------------------------------------------------------
# Parameters (also used by the orchestrator: its templates declare parameters the same
# way, and these are the one definition of the rules both sides apply)
# --------------------------------------------------------------------------------------

def as_text(value):
    """A declared default as the text a user would type (``true`` for a boolean)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _number_text(value):
    return "%g" % value


class Parameter:
    """One declared parameter and its rules: ``type`` (``items`` for a list's elements),
    ``required``, ``default``, ``pattern``, ``choices``, ``min`` / ``max``.

    A bad declaration is a ValueError (naming ``where``); a bad value is BadValue.
    """

    def __init__(self, name, spec, where):
        self.name = name
        where = "%s: parameter %r" % (where, name)
        if not isinstance(name, str) or not IDENTIFIER_RE.fullmatch(name):
            raise ValueError("%s: a parameter name must be a letter or _ then letters, "
                             "digits or _" % where)
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            raise ValueError("%s: expected a mapping (an object) with type, default, "
                             "pattern, ..." % where)
        self.spec = spec
        unknown = set(spec) - PARAMETER_KEYS
        if unknown:
            raise ValueError("%s: unknown keys %s (known: %s)"
                             % (where, sorted(unknown), ", ".join(sorted(PARAMETER_KEYS))))
        self.type = spec.get("type", "string")
        if self.type not in TYPES:
            raise ValueError("%s: type must be one of %s" % (where, ", ".join(TYPES)))
        self.items = spec.get("items", "string")
        if "items" in spec:
            if self.type != "list":
                raise ValueError("%s: 'items' is only for type list" % where)
            if self.items not in ITEM_TYPES:
                raise ValueError("%s: items must be one of %s" % (where, ", ".join(ITEM_TYPES)))
        self.kind = self.items if self.type == "list" else self.type
        self.required = spec.get("required", False)
        if not isinstance(self.required, bool):
            raise ValueError("%s: 'required' must be true or false" % where)
        self.choices = spec.get("choices", [])
        if self.kind == "choice":
            if (not isinstance(self.choices, list) or not self.choices
                    or not all(isinstance(c, str) for c in self.choices)):
                raise ValueError("%s: a choice needs a non-empty list of strings in 'choices'"
                                 % where)
        elif "choices" in spec:
            raise ValueError("%s: 'choices' is only for type choice" % where)
        self.min = spec.get("min")
        self.max = spec.get("max")
        for bound in ("min", "max"):
            value = spec.get(bound)
            if value is None:
                continue
            if self.kind not in ("int", "float"):
                raise ValueError("%s: %r is only for int and float" % (where, bound))
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError("%s: %r must be a number" % (where, bound))
        self.pattern = spec.get("pattern")
        if self.pattern is not None:
            if not isinstance(self.pattern, str):
                raise ValueError("%s: 'pattern' must be a string" % where)
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError("%s: pattern %r is not valid: %s"
                                 % (where, self.pattern, exc)) from None
        self.default = self._checked_default(spec.get("default"), where)

    def _checked_default(self, default, where):
        """The default, converted and checked like a given value."""
        if default is None:
            return [] if self.type == "list" else None
        if self.type == "list" and not isinstance(default, list):
            raise ValueError("%s: the default of a list must be a list" % where)
        try:
            if self.type == "list":
                return [self.convert(as_text(v)) for v in default]
            return self.convert(as_text(default))
        except BadValue as exc:
            raise ValueError("%s: the default is not valid: %s" % (where, exc.reason)) from None

    def _bad(self, shown, logged):
        return BadValue(self.name, shown, logged)

    def convert(self, raw):
        """One value (one element, for a list) as its type, or BadValue."""
        if "\n" in raw or "\r" in raw or "\x00" in raw:
            return self._raise("newlines and NUL bytes are not allowed in values")
        if self.type == "list" and not raw:
            return self._raise("an empty element is not allowed in a list (the entrypoint "
                               "gets a list one element per line)")
        if self.pattern and not re.fullmatch(self.pattern, raw):
            raise self._bad("%r does not match the pattern %r" % (raw, self.pattern),
                            "the value does not match the pattern %r" % self.pattern)
        kind = self.kind
        if kind in ("int", "float"):
            try:
                number = int(raw) if kind == "int" else float(raw)
            except ValueError:
                raise self._bad("%r is not a valid %s" % (raw, kind),
                                "the value is not a valid %s" % kind) from None
            if number != number or number in (float("inf"), float("-inf")):
                raise self._bad("%r is not a finite number" % raw,
                                "the value is not a finite number")
            if self.min is not None and number < self.min:
                raise self._bad("%s is less than the minimum %s" % (raw, _number_text(self.min)),
                                "the value is less than the minimum %s"
                                % _number_text(self.min))
            if self.max is not None and number > self.max:
                raise self._bad("%s is more than the maximum %s" % (raw, _number_text(self.max)),
                                "the value is more than the maximum %s"
                                % _number_text(self.max))
            return number
        if kind == "bool":
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise self._bad("%r is not a boolean (use true or false)" % raw,
                            "the value is not a boolean")
        if kind == "choice" and raw not in self.choices:
            raise self._bad("%r is not one of %s" % (raw, ", ".join(self.choices)),
                            "the value is not one of %s" % ", ".join(self.choices))
        if kind == "path" and ".." in raw.split("/"):
            return self._raise("'..' is not allowed in paths")
        if kind == "file":
            if not raw:
                return self._raise("a file name must not be empty")
            if raw.startswith("/"):
                raise self._bad("%r is absolute; give a path inside the run directory" % raw,
                                "the value is absolute; give a path inside the run directory")
            if ".." in raw.split("/"):
                return self._raise("'..' is not allowed in file names")
            if raw.startswith("-"):
                raise self._bad("%r starts with '-' and would be read as an option" % raw,
                                "the value starts with '-' and would be read as an option")
        return raw

    def _raise(self, reason):
        raise self._bad(reason, reason)

    def env_text(self, value):
        """How a converted value appears in ``RE_<name>``."""
        if isinstance(value, list):
            return "\n".join(self._one_env_text(v) for v in value)
        return self._one_env_text(value)

    def _one_env_text(self, value):
        if isinstance(value, bool):
            return "1" if value else "0"
        if self.kind == "float":
            return repr(float(value))
        if self.kind == "int":
            return str(int(value))
        if self.kind == "path":
            return os.path.expanduser(value) if value == "~" or value.startswith("~/") else value
        return str(value)


def bind_parameters(parameters, given, owner):
    """Check the values ``given`` (``{name: text | [texts]}``, the text as typed; a list
    parameter also takes one text) against ``parameters`` (``{name: Parameter}``): their
    converted values, with the defaults of those not given, or Refused. ``owner`` names
    what declares the parameters in messages (``entrypoint NAME``)."""
    if not isinstance(given, dict):
        raise Refused("the parameters must be a JSON object {\"NAME\": \"value\", ...}")
    known = ", ".join(sorted(parameters)) or "none"
    values = {}
    for name, raw in given.items():
        param = parameters.get(name)
        if param is None:
            shown = name if len(name) <= 100 else name[:100] + "..."
            raise Refused("%s has no parameter %r (parameters: %s)" % (owner, shown, known))
        if param.type == "list":
            if isinstance(raw, str):
                raw = [raw]
            if not isinstance(raw, list) or not all(isinstance(r, str) for r in raw):
                raise Refused("parameter %r: a list parameter takes a JSON list of strings"
                              % name)
            values[name] = [param.convert(r) for r in raw]
        else:
            if not isinstance(raw, str):
                raise Refused("parameter %r: give the value as a JSON string (the text "
                              "as typed)" % name)
            values[name] = param.convert(raw)
    for name, param in parameters.items():
        if name in values:
            continue
        if param.required:
            raise MissingParameter("%s needs parameter %r (parameters: %s)"
                                   % (owner, name, known), name)
        default = param.default
        values[name] = list(default) if isinstance(default, list) else default
    return values


class Entrypoint:
    """One allowlisted entrypoint: its file, pinned digest, interpreter, parameters."""

    def __init__(self, name, spec, where, base):
        where = "%s: entrypoint %r" % (where, name)
        if not ENTRYPOINT_NAME_RE.fullmatch(name):
            raise ValueError("%s: a name is letters, digits, _, . and - (not first)" % where)
        if not isinstance(spec, dict):
            raise ValueError("%s: expected an object with path, sha256, parameters, ..." % where)
        unknown = set(spec) - ENTRYPOINT_KEYS
        if unknown:
            raise ValueError("%s: unknown keys %s (known: %s)"
                             % (where, sorted(unknown), ", ".join(sorted(ENTRYPOINT_KEYS))))
        self.name = name
        path = spec.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError("%s: 'path' (the entrypoint file) is required" % where)
        self.path = _config_path(path, base)
        digest = spec.get("sha256")
        if not isinstance(digest, str) or not SHA256_RE.fullmatch(digest):
            raise ValueError("%s: 'sha256' must be the 64 hex digits of the file's sha256"
                             % where)
        self.sha256 = digest.lower()
        self.interpreter = spec.get("interpreter", ["/bin/sh"])
        if not isinstance(self.interpreter, list) or not all(
                isinstance(w, str) and w for w in self.interpreter):
            raise ValueError("%s: 'interpreter' must be a list of words ([] runs the file "
                             "itself)" % where)
        params = spec.get("parameters") or {}
        if not isinstance(params, dict):
            raise ValueError("%s: 'parameters' must be an object" % where)
        self.parameters = {}
        for pname, pspec in params.items():
            self.parameters[pname] = Parameter(pname, pspec, where)
        self.returns = check_patterns(spec.get("returns", RETURN_ALL), "%s: returns" % where,
                                 allow_empty=False)

    def read(self):
        """The file's bytes (Failure if unreadable)."""
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise Failure("entrypoint %s (%s) cannot be read: %s"
                          % (self.name, self.path, exc.strerror or exc)) from None

    def digest(self):
        """The file's current sha256, or None if unreadable."""
        try:
            return hashlib.sha256(self.read()).hexdigest()
        except Failure:
            return None

    def describe(self):
        return {
            "sha256": self.sha256,
            "digest_ok": self.digest() == self.sha256,
            "path": self.path,
            "interpreter": list(self.interpreter),
            "parameters": {n: p.spec for n, p in self.parameters.items()},
            "returns": list(self.returns),
        }

    def bind(self, given):
        """Validate the client's ``{name: raw | [raws]}`` into converted values (Refused)."""
        return bind_parameters(self.parameters, given, "entrypoint %s" % self.name)


def check_pattern(pattern, where):
    """A return-filter glob pattern, or ValueError: one line, relative, no ``..``."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("%s: every pattern must be a non-empty string, not %r"
                         % (where, pattern))
    if any(c in pattern for c in "\n\r\x00"):
        raise ValueError("%s: %r: newlines and NUL bytes are not allowed" % (where, pattern))
    if pattern.startswith(("/", "~")):
        raise ValueError("%s: %r must be relative to the run directory" % (where, pattern))
    if ".." in pattern.split("/"):
        raise ValueError("%s: %r: '..' is not allowed" % (where, pattern))
    return pattern


def check_patterns(value, where, allow_empty):
    """A list of return-filter glob patterns (see :func:`check_pattern`), or ValueError."""
    if not isinstance(value, list) or (not value and not allow_empty):
        raise ValueError("%s: must be a%s list of glob patterns"
                         % (where, "" if allow_empty else " non-empty"))
    return [check_pattern(p, where) for p in value]


# --------------------------------------------------------------------------------------
# The allowlist
# --------------------------------------------------------------------------------------

def _config_path(path, base):
    path = os.path.expanduser(path)
    return os.path.abspath(os.path.join(base, path))


def _unique_object(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError("the key %r appears twice" % key)
        obj[key] = value
    return obj


class Config:
    """The allowlist, checked."""

    def __init__(self, path):
        self.path = path
        self.base = os.path.dirname(path)
        self.log = os.path.join(self.base, "agent.log")
        self.root = None
        self.state = None
        self.entrypoints = {}
        self.never = []
        self.only = []
        self.cache = True  # whether the content cache may be used
        self.cache_max_size = None  # the site's caps (None: the client's values)
        self.cache_max_age = None
        self.token_command = None  # the program that prints a Slurm REST token

    def load(self):
        where = "allowlist %s" % self.path
        try:
            with open(self.path, "rb") as f:
                text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise Failure("%s cannot be read: %s" % (where, getattr(exc, "strerror", None)
                                                      or exc)) from None
        try:
            data = json.loads(text, object_pairs_hook=_unique_object)
        except ValueError as exc:
            raise Failure("%s is not valid JSON: %s" % (where, exc)) from None
        if not isinstance(data, dict):
            raise Failure("%s: expected a JSON object with root, entrypoints, ..." % where)
        try:
            self._load(data, where)
        except ValueError as exc:
            raise Failure(str(exc)) from None

    def _load(self, data, where):
        unknown = set(data) - ALLOWLIST_KEYS
        if unknown:
            raise ValueError("%s: unknown keys %s (known: %s)"
                             % (where, sorted(unknown), ", ".join(sorted(ALLOWLIST_KEYS))))
        if data.get("version", 1) != 1:
            raise ValueError("%s: version %r is not supported by this agent (version 1)"
                             % (where, data.get("version")))
        for key in ("root", "state", "log"):
            if key in data and (not isinstance(data[key], str) or not data[key]):
                raise ValueError("%s: %r must be a path" % (where, key))
        if "root" not in data:
            raise ValueError("%s: 'root' (the directory holding the run directories) is "
                             "required" % where)
        self.root = _config_path(data["root"], self.base)
        self.state = _config_path(data.get("state", "state"), self.base)
        self.log = _config_path(data.get("log", "agent.log"), self.base)
        real_root = os.path.realpath(self.root)
        for what, path in (("the allowlist file", self.path), ("'state'", self.state),
                           ("'log'", self.log)):
            if _within(os.path.realpath(path), real_root):
                raise ValueError("%s: %s (%s) lies inside 'root' (%s), where clients can "
                                 "write; move it out" % (where, what, path, self.root))
        entrypoints = data.get("entrypoints", {})
        if not isinstance(entrypoints, dict):
            raise ValueError("%s: 'entrypoints' must be an object" % where)
        for name, spec in entrypoints.items():
            self.entrypoints[name] = Entrypoint(name, spec, where, self.base)
        returns = data.get("returns", {})
        if not isinstance(returns, dict) or set(returns) - {"never", "only"}:
            raise ValueError("%s: 'returns' must be an object with 'never' and 'only'" % where)
        self.never = check_patterns(returns.get("never", []), "%s: returns.never" % where, True)
        self.only = check_patterns(returns.get("only", []), "%s: returns.only" % where, True)
        self._load_cache(data.get("cache", True), where)
        if "token_command" in data:
            command = data["token_command"]
            if not isinstance(command, list) or not 1 <= len(command) <= \
                    MAX_TOKEN_COMMAND_WORDS or not all(isinstance(w, str) and w
                                                       for w in command):
                raise ValueError("%s: 'token_command' must be a list of 1 to %d non-empty "
                                 "strings (the program that prints a Slurm token and its "
                                 "arguments)" % (where, MAX_TOKEN_COMMAND_WORDS))
            self.token_command = list(command)
        for what, path in (("root", self.root), ("state", self.state)):
            try:
                os.makedirs(path, 0o700, exist_ok=True)
            except OSError as exc:
                raise ValueError("%s: cannot create %s %s: %s"
                                 % (where, what, path, exc.strerror or exc)) from None
            if not os.path.isdir(path):
                raise ValueError("%s: %s %s is not a directory" % (where, what, path))


    def _load_cache(self, value, where):
        where = "%s: cache" % where
        if isinstance(value, bool):
            self.cache = value
            return
        if not isinstance(value, dict) or set(value) - CACHE_KEYS:
            raise ValueError("%s must be true, false or an object with %s"
                             % (where, " and ".join(sorted(CACHE_KEYS))))
        for key in sorted(value):
            if not _is_number(value[key]) or value[key] < 0:
                raise ValueError("%s: %r must be a number >= 0 (%s)" % (
                    where, key, "bytes" if key == "max_size" else "seconds"))
        self.cache_max_size = value.get("max_size")
        self.cache_max_age = value.get("max_age")


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------
# Small file helpers
# --------------------------------------------------------------------------------------

def _now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _isdir_nofollow(path):
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _read_text(path):
    try:
        with open(path, "rb") as f:
            return f.read(4096).decode("utf-8", "replace").strip()
    except OSError:
        return None


def _read_int(path):
    text = _read_text(path)
    if text is None or not re.fullmatch(r"-?[0-9]{1,12}", text):
        return None
    return int(text)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _write_new(path, data, mode=0o600):
    """Create ``path`` afresh (never through a symlink) holding ``data``."""
    if os.path.lexists(path):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _write_atomic(path, text):
    tmp = path + ".tmp"
    _write_new(tmp, text.encode("utf-8"))
    os.rename(tmp, path)


def _group_alive(pgid):
    """Whether process group ``pgid`` has a living member.

    ``kill(-pgid, 0)`` first; where ``/proc`` shows the processes (Linux), a group left
    with zombies only (children orphaned by a killed shell, which init has not reaped
    yet) counts as gone.
    """
    try:
        os.kill(-pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _proc_group_alive(pgid)


def _proc_group_alive(pgid):
    try:
        if not os.path.isdir("/proc/self"):
            return True
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return True
    for pid in pids:
        try:
            with open("/proc/%s/stat" % pid, "rb") as f:
                text = f.read().decode("ascii", "replace")
        except OSError:
            continue  # gone meanwhile, or not ours to see
        fields = text[text.rfind(")") + 2:].split()
        try:
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X", "x"):
                return True
        except (IndexError, ValueError):
            return True  # a /proc this code does not understand: trust kill()
    return False


def _print_json(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------

class Run:
    """``<root>/<ID>`` (the client's) and ``<state>/<ID>`` (the agent's) of one run."""

    def __init__(self, cfg, run_id):
        self.id = run_id
        self.dir = os.path.join(cfg.root, run_id)
        self.state = os.path.join(cfg.state, run_id)

    def ctl(self, name):
        return os.path.join(self.state, name)

    def exists(self):
        return _isdir_nofollow(self.dir) and _isdir_nofollow(self.state)

    def launched(self):
        return _isdir_nofollow(self.ctl(LAUNCHED))

    def cancelled(self):
        return os.path.lexists(self.ctl(CANCELLED))

    def exit_code(self):
        return _read_int(self.ctl(EXIT_CODE_FILE))

    def pgid(self):
        pgid = _read_int(self.ctl(PGID_FILE))
        return pgid if pgid is not None and pgid > 1 else None

    def alive(self):
        """True / False for a recorded process group, None without one."""
        pgid = self.pgid()
        return None if pgid is None else _group_alive(pgid)

    def launched_age(self):
        try:
            return time.time() - os.lstat(self.ctl(LAUNCHED)).st_mtime
        except OSError:
            return None

    def batch(self):
        """Whether the run was prepared for a batch job (``launch ... --batch``)."""
        return os.path.lexists(self.ctl(BATCH_FILE))

    def job_started(self):
        return _isdir_nofollow(self.ctl(JOB_STARTED))

    def job_id(self):
        text = _read_text(self.ctl(JOB_ID_FILE))
        return text if text and text.isdigit() else None

    def running(self):
        """Whether the entrypoint may still be running (launched, no exit code, not gone).

        A batch run: while its job may still come (not cancelled) or its job's guard
        was refreshed lately (the job refreshes it while it runs)."""
        if not self.launched() or self.exit_code() is not None:
            return False
        if self.batch():
            try:
                age = time.time() - os.lstat(self.ctl(JOB_STARTED)).st_mtime
            except OSError:
                return not self.cancelled()
            return age < BATCH_STALE_SECONDS
        alive = self.alive()
        if alive is None:  # a launch under way has not recorded its group yet
            age = self.launched_age()
            return age is not None and age < 2 * PGID_WAIT_SECONDS
        return alive


def _run_id(text):
    if not RUN_ID_RE.fullmatch(text):
        shown = text if len(text) <= 80 else text[:80] + "..."
        raise Refused("invalid run id %r: a run id is a lowercase UUID like "
                      "0123abcd-4567-89ab-cdef-0123456789ab" % shown)
    return text


def _existing_run(cfg, text):
    run = Run(cfg, _run_id(text))
    if not run.exists():
        raise Refused("there is no run %s on this host; create it first (create RUN_ID)"
                      % run.id)
    return run


def _arguments(args, usage, least, most):
    if not least <= len(args) <= most:
        raise Refused("unexpected arguments; usage: %s" % usage)


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------

def _rsync_version():
    rsync = shutil.which("rsync")
    if not rsync:
        return None
    try:
        proc = subprocess.Popen([rsync, "--version"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        out, _ = proc.communicate(timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.decode("utf-8", "replace").splitlines()
    return lines[0].strip() if lines else None


def _login_name():
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER") or os.environ.get("LOGNAME")


def cmd_hello(cfg, args, journal):
    _arguments(args, "hello", 0, 0)
    try:
        st = os.statvfs(cfg.root)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    _print_json({
        "agent": AGENT_NAME,
        "version": AGENT_VERSION,
        "python": "%d.%d.%d" % tuple(sys.version_info[:3]),
        "rsync": _rsync_version(),
        "root": cfg.root,
        "root_writable": os.access(cfg.root, os.W_OK | os.X_OK),
        "free_bytes": free,
        "allowlist": cfg.path,
        "entrypoints": {n: e.describe() for n, e in cfg.entrypoints.items()},
        "returns": {"never": list(cfg.never), "only": list(cfg.only)},
        "agent_forwarding": "SSH_AUTH_SOCK" in os.environ,
        "user": _login_name(),
        "home": os.environ.get("HOME") or os.path.expanduser("~"),
        "features": list(FEATURES),
    })
    return EXIT_OK


def cmd_create(cfg, args, journal):
    _arguments(args, "create RUN_ID", 1, 1)
    run = Run(cfg, _run_id(args[0]))
    has_state = _isdir_nofollow(run.state)
    if os.path.lexists(run.dir) and not (has_state and _isdir_nofollow(run.dir)):
        raise Refused("%s exists but was not made by the remote-exec agent; choose another "
                      "run id" % run.dir)
    if has_state and _isdir_nofollow(run.dir):
        _print_json({"rundir": run.dir, "existed": True})
        return EXIT_OK
    if has_state and os.path.lexists(run.ctl(LAUNCHED)):
        raise Refused("run %s was launched but its run directory is gone; remove it "
                      "(remove RUN_ID) and create it again" % run.id)
    try:
        os.mkdir(run.state, 0o700)
    except FileExistsError:
        pass
    existed = False
    try:
        os.mkdir(run.dir, 0o700)
    except FileExistsError:  # a create racing with this one
        if not run.exists():
            raise Refused("%s exists but was not made by the remote-exec agent"
                          % run.dir) from None
        existed = True
    _print_json({"rundir": run.dir, "existed": existed})
    return EXIT_OK


def cmd_status(cfg, args, journal):
    _arguments(args, "status RUN_ID", 1, 1)
    run = Run(cfg, _run_id(args[0]))
    exists = run.exists()
    pgid = run.pgid() if exists else None
    batch = exists and run.batch()
    _print_json({
        "exists": exists,
        "rundir": run.dir,
        "launched": exists and run.launched(),
        "cancelled": exists and run.cancelled(),
        "entrypoint": _read_text(run.ctl("entrypoint_name")) if exists else None,
        "pgid": pgid,
        "alive": None if pgid is None or batch else _group_alive(pgid),
        "exit_code": run.exit_code() if exists else None,
        "started_at": _read_text(run.ctl("started_at")) if exists else None,
        "batch": batch,
        "job_id": run.job_id() if batch else None,
        "job_host": (_read_text(run.ctl(JOB_HOST_FILE)) or None) if batch else None,
        "job_command": batch_job_command(cfg, run) if batch else None,
        "job_output": run.ctl(JOB_OUTPUT_FILE) if batch else None,
    })
    return EXIT_OK


def _read_json_stdin(limit, what, shape):
    """The JSON on stdin (``{}`` if there is none), at most ``limit`` bytes; Refused
    naming ``what`` and the expected ``shape`` otherwise."""
    stream = getattr(sys.stdin, "buffer", None)
    data = stream.read(limit + 1) if stream is not None else b""
    if len(data) > limit:
        raise Refused("the %s on stdin are larger than %d bytes" % (what, limit))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("the %s on stdin are not UTF-8" % what) from None
    if not text.strip():
        return {}
    try:
        return json.loads(text, object_pairs_hook=_unique_object)
    except ValueError as exc:
        reason = str(exc) if "appears twice" in str(exc) else "not valid JSON"
        raise Refused("the %s on stdin must be a JSON object %s: %s"
                      % (what, shape, reason)) from None


def _read_parameters():
    return _read_json_stdin(MAX_PARAMETERS_BYTES, "parameters", "{\"NAME\": \"value\", ...}")


def _entrypoint_vars(run, entrypoint, values):
    """The variables the agent adds for the entrypoint: ``RE_<name>`` of each parameter
    that has a value, and the run's id, directory and params.json."""
    added = {}
    for name, param in entrypoint.parameters.items():
        value = values.get(name)
        if value is not None:
            added["RE_" + name] = param.env_text(value)
    added["REMOTE_EXEC_RUN_ID"] = run.id
    added["REMOTE_EXEC_RUN_DIR"] = run.dir
    added["REMOTE_EXEC_PARAMS"] = run.ctl("params.json")
    return added


def _entrypoint_env(entrypoint, added):
    """The agent's environment without the SSH session's request and agent socket and
    without any ``RE_<parameter>`` of its own, plus ``added``."""
    env = dict(os.environ)
    for name in ("SSH_ORIGINAL_COMMAND", "SSH_AUTH_SOCK"):
        env.pop(name, None)
    for name in entrypoint.parameters:
        env.pop("RE_" + name, None)
    env.update(added)
    return env


def _params_json(entrypoint, values):
    """params.json: the converted values (paths with ``~`` expanded, as in RE_<name>)."""
    out = {}
    for name, param in entrypoint.parameters.items():
        value = values.get(name)
        if param.kind == "path" and value is not None:
            if isinstance(value, list):
                value = [param.env_text(v) for v in value]
            else:
                value = param.env_text(value)
        out[name] = value
    return out


def _noop_handler(signum, frame):
    pass


def _wrapper(run, entrypoint, argv, env, log_fd, ready_fd):
    """The detached run: a session of its own; runs the entrypoint, records its exit code."""
    try:
        os.setsid()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, _noop_handler)
        _write_atomic(run.ctl(PGID_FILE), "%d\n" % os.getpid())
        os.write(ready_fd, b"1")
        os.close(ready_fd)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        if devnull > 2:
            os.close(devnull)
        try:
            _write_atomic(run.ctl("started_at"), _now_iso() + "\n")
        except OSError:
            pass
        # the file runs where the administrator installed it (it may use files beside
        # it); so it is checked once more, right before it starts
        if entrypoint.digest() != entrypoint.sha256:
            _write_all(log_fd, ("remote-exec agent: entrypoint %s (%s) changed after it was "
                                "checked; not run\n" % (entrypoint.name, entrypoint.path)
                                ).encode("utf-8", "replace"))
            _write_atomic(run.ctl(EXIT_CODE_FILE), "126\n")
            return
        try:
            proc = subprocess.Popen(argv, cwd=run.dir, stdin=subprocess.DEVNULL,
                                    stdout=log_fd, stderr=subprocess.STDOUT, env=env)
        except OSError as exc:
            try:
                _write_all(log_fd, ("remote-exec agent: cannot start the entrypoint (%s): %s\n"
                                    % (" ".join(argv), exc)).encode("utf-8", "replace"))
            except OSError:
                pass
            code = 127
        else:
            code = proc.wait()
            if code < 0:
                code = 128 - code
        _write_atomic(run.ctl(EXIT_CODE_FILE), "%d\n" % code)
    except BaseException:  # noqa: B036 - the wrapper must never return into the agent
        try:
            _write_all(log_fd, ("remote-exec agent: the run's wrapper failed:\n%s"
                                % traceback.format_exc()).encode("utf-8", "replace"))
        except BaseException:  # noqa: B036, S110 - nothing else can be told
            pass
    finally:
        os._exit(0)


def _open_run_log(run):
    path = os.path.join(run.dir, LOG_NAME)
    if os.path.islink(path):
        os.unlink(path)
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise Failure("cannot open %s: %s" % (path, exc.strerror or exc)) from None


def approved_entrypoint(cfg, name):
    """The allowlisted entrypoint ``name`` and its file's bytes, which have the pinned
    sha256; or EntrypointNotAllowed / DigestMismatch (Failure if unreadable)."""
    entrypoint = cfg.entrypoints.get(name)
    if entrypoint is None:
        allowed = ", ".join(sorted(cfg.entrypoints)) or "none"
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise EntrypointNotAllowed("entrypoint %r is not in the allowlist (allowed: %s)"
                                   % (shown, allowed))
    code = entrypoint.read()
    digest = hashlib.sha256(code).hexdigest()
    if digest != entrypoint.sha256:
        raise DigestMismatch("entrypoint %s (%s) has sha256 %s but the allowlist pins %s; the "
                             "site administrator must re-approve it"
                             % (name, entrypoint.path, digest, entrypoint.sha256))
    return entrypoint, code


def _accept_launch(cfg, run_id, name):
    """What ``launch`` and ``launch --batch`` check and record before the entrypoint can
    start: the run exists and was not cancelled, the entrypoint is approved (its
    sha256), the parameters bind, the run log can be one; then the launch-once guard
    (AlreadyLaunched) and the records of the run (the approved bytes, params.json, the
    entrypoint's name, the staged inputs). Returns ``(run, entrypoint, values)``."""
    run = _existing_run(cfg, run_id)
    if run.cancelled():
        raise Refused("the run was cancelled; create a new run")
    entrypoint, code = approved_entrypoint(cfg, name)
    values = entrypoint.bind(_read_parameters())
    log_path = os.path.join(run.dir, LOG_NAME)
    try:
        mode = os.lstat(log_path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISLNK(mode) and not stat.S_ISREG(mode):
        raise Refused("%s is not a regular file; the run log must be a regular file inside "
                      "the run directory" % log_path)

    try:
        os.mkdir(run.ctl(LAUNCHED), 0o700)
    except FileExistsError:
        raise AlreadyLaunched() from None
    if run.cancelled():  # a cancel got in between: the run never starts
        if run.exit_code() is None:
            _write_atomic(run.ctl(EXIT_CODE_FILE), "%d\n" % EXIT_TERMINATED)
        raise Refused("the run was cancelled; create a new run")
    # the approved bytes, kept as the record of what this run was allowed to start
    _write_new(run.ctl("entrypoint"), code, 0o500)
    _write_new(run.ctl("params.json"),
               (json.dumps(_params_json(entrypoint, values), indent=1) + "\n").encode("utf-8"))
    _write_new(run.ctl("entrypoint_name"), (name + "\n").encode("utf-8"))
    # the inputs as staged: those still so when results are fetched do not go back
    try:
        _write_new(run.ctl(STAGED_FILE), json.dumps(staged_files(run.dir)).encode("utf-8"))
    except OSError:
        pass  # (then all of them do)
    return run, entrypoint, values


def _parameter_names(values):
    return ", ".join(sorted(n for n in values if values[n] is not None)) or "none"


def cmd_launch(cfg, args, journal):
    usage = "launch RUN_ID ENTRYPOINT [--batch] (parameters as a JSON object on stdin)"
    batch = len(args) == 3 and args[2] == "--batch"
    _arguments(args[:2] if batch else args, usage, 2, 2)
    run, entrypoint, values = _accept_launch(cfg, args[0], args[1])
    name = entrypoint.name
    if batch:
        return _prepare_batch(cfg, run, entrypoint, values, journal)
    log_fd = _open_run_log(run)
    argv = list(entrypoint.interpreter) + [entrypoint.path]
    env = _entrypoint_env(entrypoint, _entrypoint_vars(run, entrypoint, values))

    sys.stdout.flush()
    sys.stderr.flush()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the wrapper: never returns into the agent
        try:
            os.close(ready_r)
            _wrapper(run, entrypoint, argv, env, log_fd, ready_w)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(log_fd)
    try:
        ready = os.read(ready_r, 1)
    finally:
        os.close(ready_r)
    if not ready:
        os.waitpid(pid, 0)
        raise Failure("the run's wrapper process could not start")
    if run.pgid() != pid:
        _write_atomic(run.ctl(PGID_FILE), "%d\n" % pid)
    try:
        sys.stdout.write("started %d\n" % pid)
        sys.stdout.flush()
    except OSError:
        pass  # the client went away; the run goes on
    journal.record("launched pgid %d (entrypoint %s; parameters: %s)"
                   % (pid, name, _parameter_names(values)))
    os.waitpid(pid, 0)
    code = run.exit_code()
    return EXIT_FAILURE if code is None else code


# --------------------------------------------------------------------------------------
# Batch jobs
# --------------------------------------------------------------------------------------

def batch_job_command(cfg, run):
    """The command a batch job runs on its compute node to start the run's entrypoint."""
    return [sys.executable, os.path.abspath(__file__), "--allowlist",
            os.path.abspath(cfg.path), "--batch-job", run.id]


def _prepare_batch(cfg, run, entrypoint, values, journal):
    """``launch ... --batch`` once the launch is accepted: batch.json, then the job's
    command for the client (which submits the job)."""
    batch = {"entrypoint": entrypoint.name,
             "env": _entrypoint_vars(run, entrypoint, values)}
    _write_new(run.ctl(BATCH_FILE), (json.dumps(batch, indent=1) + "\n").encode("utf-8"))
    journal.verdict = ("ok: prepared for a batch job (entrypoint %s; parameters: %s)"
                       % (entrypoint.name, _parameter_names(values)))
    _print_json({"prepared": True, "job_command": batch_job_command(cfg, run),
                 "job_output": run.ctl(JOB_OUTPUT_FILE)})
    return EXIT_OK


def _read_batch(run):
    """batch.json: ``(entrypoint name, {variable: value})`` (Failure if malformed)."""
    try:
        with open(run.ctl(BATCH_FILE), "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise Failure("%s cannot be read: %s" % (run.ctl(BATCH_FILE), exc)) from None
    name = data.get("entrypoint") if isinstance(data, dict) else None
    env = data.get("env") if isinstance(data, dict) else None
    if not isinstance(name, str) or not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise Failure("%s is not what launch --batch writes" % run.ctl(BATCH_FILE))
    return name, env


def _cancel_grace(run):
    """The grace a ``cancel`` asked for, else DEFAULT_CANCEL_GRACE."""
    grace = _read_int(run.ctl(CANCEL_GRACE_FILE))
    return DEFAULT_CANCEL_GRACE if grace is None or grace < 0 else grace


class _Stop:
    """The signal that asked a batch job to stop (TERM, INT or HUP), if any."""

    signum = None

    @classmethod
    def handler(cls, signum, frame):
        if cls.signum is None:
            cls.signum = signum


def _note_in_log(run, text):
    """One line of the agent's own in the run log (appended; never fails)."""
    path = os.path.join(run.dir, LOG_NAME)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            _write_all(fd, (SAY_PREFIX + text + "\n").encode("utf-8", "replace"))
        finally:
            os.close(fd)
    except OSError:
        pass


def run_batch_job(cfg, run_id, journal):
    """``--batch-job RUN_ID`` (on the compute node, as the job's own process): start the
    prepared run's entrypoint once, stop it when the run is cancelled or the job is
    signalled, record its exit code; returns that code (0..255)."""
    if "SSH_ORIGINAL_COMMAND" in os.environ:
        raise Refused("--batch-job is run by a batch job, never through SSH")
    run = _existing_run(cfg, run_id)
    if not run.launched() or not run.batch():
        raise Refused("run %s was not prepared for a batch job (launch RUN_ID ENTRYPOINT "
                      "--batch)" % run.id)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _Stop.handler)
    try:
        os.mkdir(run.ctl(JOB_STARTED), 0o700)
    except FileExistsError:
        raise Failure("the batch job of run %s was started before; it runs only once"
                      % run.id) from None
    job_id = os.environ.get("SLURM_JOB_ID", "")
    if re.fullmatch(r"[0-9]{1,20}", job_id):
        _write_atomic(run.ctl(JOB_ID_FILE), job_id + "\n")
    else:
        job_id = None
    host = os.uname()[1]
    _write_atomic(run.ctl(JOB_HOST_FILE), host + "\n")
    where = "on %s%s" % (host, "" if job_id is None else " (job %s)" % job_id)
    try:
        return _batch_entrypoint(cfg, run, where, journal)
    except Failure as exc:  # (after the guard: the run gets an exit code all the same)
        if run.exit_code() is None:
            _note_in_log(run, "the batch job could not start the entrypoint: %s" % exc)
            _write_atomic(run.ctl(EXIT_CODE_FILE), "127\n")
        raise


def _batch_entrypoint(cfg, run, where, journal):
    """The batch job once its guard is taken: the entrypoint, unless the run was
    cancelled or the entrypoint is no longer the approved one; its exit code."""
    if run.cancelled() or _Stop.signum is not None:
        if run.exit_code() is None:
            _write_atomic(run.ctl(EXIT_CODE_FILE), "%d\n" % EXIT_TERMINATED)
        journal.verdict = "ok: batch job %s: the run was cancelled; not started" % where
        return EXIT_OK
    name, added = _read_batch(run)
    try:
        entrypoint, code = approved_entrypoint(cfg, name)
        if code != _read_bytes(run.ctl("entrypoint")):  # the allowlist was changed since
            raise DigestMismatch("entrypoint %s (%s) is not the one approved at launch"
                                 % (name, entrypoint.path))
    except (Refused, Failure) as exc:
        _note_in_log(run, "entrypoint %s changed after it was checked; not run: %s"
                     % (name, exc))
        _write_atomic(run.ctl(EXIT_CODE_FILE), "126\n")
        journal.verdict = "error: batch job %s: %s; not run (exit 126)" % (where, exc)
        return 126
    log_fd = _open_run_log(run)
    argv = list(entrypoint.interpreter) + [entrypoint.path]
    try:
        proc = subprocess.Popen(argv, cwd=run.dir, stdin=subprocess.DEVNULL, stdout=log_fd,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=_entrypoint_env(entrypoint, added))
    except OSError as exc:
        _note_in_log(run, "cannot start the entrypoint (%s): %s" % (" ".join(argv), exc))
        _write_atomic(run.ctl(EXIT_CODE_FILE), "127\n")
        journal.verdict = "error: batch job %s: cannot start the entrypoint" % where
        return 127
    finally:
        os.close(log_fd)
    try:
        _write_atomic(run.ctl("started_at"), _now_iso() + "\n")
    except OSError:
        pass
    journal.write(
        "batch job %s: started entrypoint %s (pid %d)" % (where, name, proc.pid))
    code = _supervise(run, proc)
    if code < 0:
        code = 128 - code
    _write_atomic(run.ctl(EXIT_CODE_FILE), "%d\n" % code)
    journal.verdict = "ok: batch job %s: the entrypoint ended with exit code %d%s" % (
        where, code, "" if _Stop.signum is None else " (stopped: signal %d)" % _Stop.signum)
    return min(max(code, 0), 255)


def _supervise(run, proc):
    """Wait for the batch job's entrypoint; on a cancel mark or a signal to the job,
    TERM its process group, then KILL it after the grace. Its returncode."""
    stop_at = kill_at = None
    beat = time.monotonic()
    while True:
        code = proc.poll()
        if code is not None:
            break
        now = time.monotonic()
        if stop_at is None and (_Stop.signum is not None or run.cancelled()):
            stop_at = now
            kill_at = now + _cancel_grace(run)
            _signal_group(proc.pid, signal.SIGTERM)
        elif kill_at is not None and now >= kill_at:
            kill_at = None
            _signal_group(proc.pid, signal.SIGKILL)
        if now - beat >= BATCH_HEARTBEAT_SECONDS:
            beat = now
            try:
                os.utime(run.ctl(JOB_STARTED))
            except OSError:
                pass
        time.sleep(POLL_SECONDS)
    if stop_at is not None:
        _signal_group(proc.pid, signal.SIGKILL)  # what is left of its group
    return code


def _signal_group(pgid, signum):
    try:
        os.killpg(pgid, signum)
    except OSError:
        pass  # (gone)


def _read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def cmd_wait(cfg, args, journal):
    _arguments(args, "wait RUN_ID", 1, 1)
    run = _existing_run(cfg, args[0])
    if not run.launched():
        raise Refused("run %s was not launched; launch it first" % run.id)
    if run.batch():  # its job runs elsewhere: the client asks the scheduler
        code = run.exit_code()
        _print_json({"exit_code": code} if code is not None
                    else {"exit_code": None, "batch": True})
        return EXIT_OK
    while True:
        code = run.exit_code()
        if code is not None:
            _print_json({"exit_code": code})
            return EXIT_OK
        if not run.running():
            time.sleep(POLL_SECONDS)
            code = run.exit_code()
            if code is not None:
                continue
            _print_json({"exit_code": None, "lost": True})
            journal.verdict = "error: run lost (its process group is gone without an exit code)"
            return EXIT_LOST
        time.sleep(POLL_SECONDS)


def cmd_log(cfg, args, journal):
    usage = "log RUN_ID [--offset N] [--follow]"
    if not args:
        raise Refused("unexpected arguments; usage: %s" % usage)
    run = _existing_run(cfg, args[0])
    offset = 0
    follow = False
    rest = list(args[1:])
    seen = set()
    while rest:
        word = rest.pop(0)
        if word == "--follow" and "follow" not in seen:
            follow = True
            seen.add("follow")
            continue
        if word.startswith("--offset") and "offset" not in seen:
            if word == "--offset" and rest:
                value = rest.pop(0)
            elif word.startswith("--offset="):
                value = word[len("--offset="):]
            else:
                value = ""
            if not re.fullmatch(r"[0-9]{1,18}", value):
                raise Refused("--offset needs a byte offset (digits); usage: %s" % usage)
            offset = int(value)
            seen.add("offset")
            continue
        raise Refused("unexpected arguments; usage: %s" % usage)
    path = os.path.join(run.dir, LOG_NAME)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return EXIT_OK
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused("%s is a symbolic link; the agent serves only a regular log file"
                          % path) from None
        raise Failure("cannot read %s: %s" % (path, exc.strerror or exc)) from None
    out = sys.stdout.buffer
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Refused("%s is not a regular file" % path)
        os.lseek(fd, offset, os.SEEK_SET)

        def drain():
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return
                out.write(chunk)
                out.flush()

        drain()
        while follow:
            finished = run.exit_code() is not None or not run.running()
            drain()
            if finished:
                break
            time.sleep(LOG_POLL_SECONDS)
        out.flush()
    finally:
        os.close(fd)
    return EXIT_OK


def cmd_cancel(cfg, args, journal):
    # it must finish even if its SSH channel goes away
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    _arguments(args, "cancel RUN_ID [GRACE_SECONDS]", 1, 2)
    grace = DEFAULT_CANCEL_GRACE
    if len(args) == 2:
        if not re.fullmatch(r"[0-9]{1,9}", args[1]):
            raise Refused("GRACE_SECONDS must be a whole number of seconds >= 0")
        grace = int(args[1])
    run = _existing_run(cfg, args[0])

    def result(text, code=EXIT_OK):
        journal.verdict = ("ok" if code == EXIT_OK else "error") + ": " + text
        _print_json({"result": text})
        return code

    if run.exit_code() is None:  # (the grace a batch job uses once it sees the mark)
        _write_atomic(run.ctl(CANCEL_GRACE_FILE), "%d\n" % grace)
    fd = os.open(run.ctl(CANCELLED), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    os.close(fd)
    try:
        os.mkdir(run.ctl(LAUNCHED), 0o700)
    except FileExistsError:
        pass
    else:
        _write_atomic(run.ctl(EXIT_CODE_FILE), "%d\n" % EXIT_TERMINATED)
        return result("not started")
    deadline = time.monotonic() + PGID_WAIT_SECONDS
    while run.pgid() is None and run.exit_code() is None and not run.batch() \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    if run.batch():  # its job stops it, on its own node: never a signal from here
        return _cancel_batch(run, grace, result)
    pgid = run.pgid()
    if pgid is None:
        if run.exit_code() is not None:  # a launch that saw the cancel and never started
            return result("not started")
        return result("no process group recorded", EXIT_FAILURE)
    if run.exit_code() is not None:
        return result("already finished")
    try:
        os.kill(-pgid, signal.SIGTERM)
    except ProcessLookupError:
        return result("already gone")
    deadline = time.monotonic() + grace
    while True:
        if not _group_alive(pgid):
            if run.exit_code() is None:
                time.sleep(POLL_SECONDS)
                if run.exit_code() is None:
                    _write_atomic(run.ctl(EXIT_CODE_FILE), "%d\n" % EXIT_TERMINATED)
            return result("stopped by TERM")
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
    try:
        os.kill(-pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 1.0
    while run.exit_code() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if run.exit_code() is None:
        _write_atomic(run.ctl(EXIT_CODE_FILE), "%d\n" % EXIT_KILLED)
    return result("killed")


def _cancel_batch(run, grace, result):
    """``cancel`` of a batch run, once the cancel mark is there."""
    if run.exit_code() is not None:
        return result("already finished")
    if not run.job_started():
        return result("marked cancelled: its job exits as soon as it starts")
    deadline = time.monotonic() + grace + BATCH_CANCEL_SLACK
    while run.exit_code() is None and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    if run.exit_code() is not None:
        return result("stopped by its job")
    return result("marked cancelled: its job stops the entrypoint")


def cmd_remove(cfg, args, journal):
    _arguments(args, "remove RUN_ID", 1, 1)
    run = Run(cfg, _run_id(args[0]))
    has_dir = os.path.lexists(run.dir)
    has_state = _isdir_nofollow(run.state)
    if has_dir and not has_state:
        raise Refused("%s was not made by the remote-exec agent; it is not removed" % run.dir)
    if not has_state:
        _print_json({"removed": False})
        return EXIT_OK
    if run.running():
        pgid = run.pgid()
        raise Refused("run %s is still running%s; cancel it first (cancel RUN_ID)"
                      % (run.id, "" if pgid is None else " (process group %d)" % pgid))
    try:
        if has_dir:
            _rmtree(run.dir)
        _rmtree(run.state)
    except OSError as exc:
        raise Failure("cannot remove run %s: %s: %s"
                      % (run.id, exc.filename, exc.strerror or exc)) from None
    _print_json({"removed": True})
    return EXIT_OK


def cmd_list(cfg, args, journal):
    _arguments(args, "list", 0, 0)
    now = time.time()
    runs = []
    try:
        names = os.listdir(cfg.root)
    except OSError as exc:
        raise Failure("cannot list %s: %s" % (cfg.root, exc.strerror or exc)) from None
    for name in names:
        if not RUN_ID_RE.fullmatch(name):
            continue
        run = Run(cfg, name)
        if not run.exists():
            continue
        try:
            mtime = os.lstat(run.dir).st_mtime
        except OSError:
            continue
        code = run.exit_code()
        if code is not None:
            state = "finished"
        elif not run.launched():
            state = "not launched"
        elif run.running():
            state = "running"
        else:
            state = "dead"
        runs.append((mtime, {"id": name, "age_seconds": int(max(0, now - mtime)),
                             "state": state, "exit_code": code}))
    runs.sort(key=lambda r: (r[0], r[1]["id"]))
    _print_json({"runs": [r[1] for r in runs]})
    return EXIT_OK


def cmd_token(cfg, args, journal):
    """A Slurm REST token: what the allowlist's ``token_command`` prints, as it is (the
    output is never written to the agent log)."""
    _arguments(args, "token", 0, 0)
    if cfg.token_command is None:
        raise Refused("this site gives no Slurm tokens: its allowlist has no token_command")
    env = dict(os.environ)
    env.pop("SSH_ORIGINAL_COMMAND", None)
    shown = cfg.token_command[0]
    try:
        proc = subprocess.Popen(cfg.token_command, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    except OSError as exc:
        raise Failure("the token command %s cannot be started: %s"
                      % (shown, exc.strerror or exc)) from None
    try:
        out, err = proc.communicate(timeout=TOKEN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise Failure("the token command %s did not finish within %d s"
                      % (shown, TOKEN_TIMEOUT)) from None
    if proc.returncode != 0:
        lines = [line.strip() for line in err.decode("utf-8", "replace").splitlines()
                 if line.strip()]
        raise Failure("the token command %s failed with exit status %d%s" % (
            shown, proc.returncode if proc.returncode >= 0 else 128 - proc.returncode,
            ": " + lines[-1][:500] if lines else " (and wrote nothing on stderr)"))
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    journal.verdict = "ok: printed the token command's output (%d bytes)" % len(out)
    return EXIT_OK


# --------------------------------------------------------------------------------------
# Writing into a run directory (rsync and the content cache)
# --------------------------------------------------------------------------------------

def _inputs_may_change(run):
    """Refused once the run was launched or cancelled: its inputs are then fixed."""
    if run.cancelled():
        raise Refused("run %s was cancelled; its inputs can no longer change" % run.id)
    if run.launched():
        raise Refused("run %s was launched; its inputs can no longer change" % run.id)


def run_member(run, parts, make_parents=False):
    """The path of ``parts`` (components, no ``..``) below the run directory, never
    through a symbolic link: Refused if a component that exists is one; with
    ``make_parents``, missing directories above the last component are made (0700)."""
    path = run.dir
    for i, part in enumerate(parts):
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not make_parents or i == len(parts) - 1:
                return os.path.join(run.dir, *parts)
            os.mkdir(path, 0o700)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise Refused("%s is a symbolic link; the agent never writes through one" % path)
    return path


def _member_parts(name):
    """A client's name of a file in a run directory (``/``-separated, relative) as its
    components; Refused if it could leave the directory or is not a plain name."""
    if not isinstance(name, str) or not name or "\x00" in name or name.startswith("/"):
        raise Refused("a file name in a run directory must be a non-empty relative path")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise Refused("a file name in a run directory may not have empty, '.' or '..' "
                      "components")
    return parts


# --------------------------------------------------------------------------------------
# The content cache (remote-exec's open SSH sites apply the same layout and trim policy)
# --------------------------------------------------------------------------------------

def cache_entry(cache_dir, digest):
    """The path of the entry of ``digest`` (64 lowercase hex digits, else ValueError)."""
    if not isinstance(digest, str) or not CACHE_DIGEST_RE.fullmatch(digest):
        raise ValueError("a cache entry is named by a sha256: 64 lowercase hex digits")
    return posixpath.join(cache_dir, digest[:2], digest)


def cache_tmp_name(digest, run_id):
    """The name, beside its entry, of the copy a run is inserting."""
    return "%s%s-%s" % (CACHE_TMP_PREFIX, digest, run_id)


def cache_trim_plan(entries, max_size, max_age, now):
    """What trimming removes of ``entries`` (``(path, size, mtime)`` of the files in the
    cache's prefix directories): insertions left unfinished for CACHE_TMP_MAX_AGE,
    entries unused for longer than ``max_age`` seconds, then the least recently used
    beyond ``max_size`` bytes. Returns ``[(path, size, why)]``."""
    gone = []
    kept = []
    for path, size, mtime in entries:
        name = posixpath.basename(path)
        if name.startswith(CACHE_TMP_PREFIX):
            if now - mtime > CACHE_TMP_MAX_AGE:
                gone.append((path, size, "unfinished insertion"))
        elif CACHE_DIGEST_RE.fullmatch(name):
            if now - mtime > max_age:
                gone.append((path, size, "unused for %.1f days" % ((now - mtime) / 86400)))
            else:
                kept.append((path, size, mtime))
    total = 0
    for path, size, _mtime in sorted(kept, key=lambda e: e[2], reverse=True):
        total += size
        if total > max_size:
            gone.append((path, size, "over the cache's size cap"))
    return gone


def _copy_into(src, dst):
    """Copy the open file ``src`` into the empty open file ``dst``: a reflink where the
    file system has them, else the bytes (the kernel's sendfile, else read and write).
    Never a hard link: writing to one side never changes the other."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return
    except OSError:
        pass
    offset = 0
    try:
        while True:
            sent = os.sendfile(dst, src, offset, CACHE_CHUNK * 64)
            if not sent:
                return
            offset += sent
    except OSError:
        if offset:
            raise
    os.lseek(src, 0, os.SEEK_SET)
    while True:
        chunk = os.read(src, CACHE_CHUNK)
        if not chunk:
            return
        _write_all(dst, chunk)


def _sha256_of(fd):
    """The sha256 of the open file ``fd``, read from its start."""
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        chunk = os.read(fd, CACHE_CHUNK)
        if not chunk:
            return digest.hexdigest()
        digest.update(chunk)


def _verified_copy(src, path, digest, mode):
    """Copy the open file ``src`` to a new file ``path`` and hash the copy: True when the
    copy's sha256 is ``digest`` (the copy then has ``mode``); else it is removed."""
    dst = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        _copy_into(src, dst)
        good = _sha256_of(dst) == digest
        if good:
            os.fchmod(dst, mode)
    except BaseException:
        os.close(dst)
        os.unlink(path)
        raise
    os.close(dst)
    if not good:
        os.unlink(path)
    return good


def _open_regular(path, size):
    """``path`` opened for reading if it is a regular file (not a symbolic link) of
    ``size`` bytes; else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_size == size:
        return fd
    os.close(fd)
    return None


def _cache_dir(cfg, create):
    """The cache's directory: (path, "") when it can be used, else (None, why); why is
    "" when it does not exist and ``create`` is false. It must be a directory of this
    user that no one else may enter."""
    path = os.path.join(cfg.root, CACHE_DIR)
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, ("%s could not be created" % path) if create else ""
    if not stat.S_ISDIR(st.st_mode):
        return None, "%s is not a directory" % path
    if st.st_uid != os.getuid():
        return None, "%s belongs to another user (uid %d)" % (path, st.st_uid)
    if st.st_mode & 0o077:
        return None, "%s is open to other users (mode %s); make it 0700" % (
            path, oct(st.st_mode & 0o777))
    return path, ""


def _cache_request(cfg, with_files):
    """The client's cache request (JSON on stdin): ``files``, each ``{"name", "size",
    "sha256"[, "mtime_ns"]}`` (with_files), ``max_size``, ``max_age``, ``dry_run``;
    checked. The site's caps apply to max_size and max_age (no limit if neither the
    client nor the site gives one)."""
    request = _read_json_stdin(MAX_CACHE_REQUEST_BYTES, "cache request",
                               "{\"files\": [{\"name\": ..., \"size\": ..., \"sha256\": ...}]}")
    if not isinstance(request, dict):
        raise Refused("the cache request must be a JSON object")
    files = request.get("files", [])
    if not isinstance(files, list) or (files and not with_files):
        raise Refused("the cache request's files must be a list (none for cache-trim)")
    checked = []
    for item in files:
        if not isinstance(item, dict):
            raise Refused("each file of a cache request is an object {name, size, sha256}")
        size, mtime = item.get("size"), item.get("mtime_ns", None)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise Refused("a file's size must be a whole number of bytes")
        if mtime is not None and (not isinstance(mtime, int) or isinstance(mtime, bool)):
            raise Refused("a file's mtime_ns must be a whole number of nanoseconds")
        try:
            cache_entry("", item.get("sha256"))
        except ValueError as exc:
            raise Refused("a file's sha256: %s" % exc) from None
        checked.append((item.get("name"), _member_parts(item.get("name")), size,
                        item["sha256"], mtime))
    limits = []
    for key, cap in (("max_size", cfg.cache_max_size), ("max_age", cfg.cache_max_age)):
        value = request.get(key, float("inf"))
        if not _is_number(value) or value < 0:
            raise Refused("the cache request's %s must be a number >= 0" % key)
        limits.append(value if cap is None else min(value, cap))
    return checked, limits[0], limits[1], request.get("dry_run") is True


def _place(cache, run, name, parts, size, digest, mtime_ns):
    """Copy the entry of ``digest`` to ``name`` in the run directory and verify the copy:
    "placed", "absent" (no usable entry) or "changed" (its bytes are no longer its name:
    the entry is removed)."""
    entry = cache_entry(cache, digest)
    src = _open_regular(entry, size)
    if src is None:
        return "absent"
    try:
        target = run_member(run, parts, make_parents=True)
        tmp = os.path.join(os.path.dirname(target), ".remote-exec-placing-%s-%s"
                           % (digest[:16], os.urandom(4).hex()))
        if not _verified_copy(src, tmp, digest, 0o600):
            os.unlink(entry)
            return "changed"
    finally:
        os.close(src)
    try:
        if mtime_ns is not None:  # (rsync's quick check then leaves the copy)
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.rename(tmp, target)
    except OSError:
        os.unlink(tmp)
        raise
    try:
        os.utime(entry)  # (used now: the least recently used go first)
    except OSError:
        pass
    return "placed"


def _insert(cache, run, parts, size, digest):
    """Copy the run's staged file to the cache as the entry of ``digest``: "inserted",
    "present" (the cache has it), "missing" (no such regular file of that size in the
    run directory) or "mismatch" (its bytes are not ``digest``)."""
    entry = cache_entry(cache, digest)
    held = _open_regular(entry, size)
    if held is not None:
        os.close(held)
        return "present"
    src = _open_regular(run_member(run, parts), size)
    if src is None:
        return "missing"
    try:
        prefix = os.path.dirname(entry)
        try:
            os.mkdir(prefix, 0o700)
        except FileExistsError:
            if not _isdir_nofollow(prefix):
                return "missing"
        tmp = os.path.join(prefix, cache_tmp_name(digest, run.id))
        if os.path.lexists(tmp):
            os.unlink(tmp)
        if not _verified_copy(src, tmp, digest, 0o444):
            return "mismatch"
    finally:
        os.close(src)
    os.rename(tmp, entry)
    return "inserted"


def _cache_listing(cache):
    """(path, size, mtime) of every regular file in the cache's prefix directories."""
    found = []
    for prefix in sorted(os.listdir(cache)):
        directory = os.path.join(cache, prefix)
        if not CACHE_PREFIX_RE.fullmatch(prefix) or not _isdir_nofollow(directory):
            continue
        for name in os.listdir(directory):
            try:
                st = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((os.path.join(directory, name), st.st_size, st.st_mtime))
    return found


def _trim(cache, max_size, max_age, dry_run):
    trimmed = []
    for path, size, why in cache_trim_plan(_cache_listing(cache), max_size, max_age,
                                           time.time()):
        verdict = "would remove" if dry_run else "removed"
        if not dry_run:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass  # (another run trimmed it)
            except OSError:
                verdict = "failed"
        trimmed.append({"path": path, "size": size, "why": why, "verdict": verdict})
    return trimmed


def _cache_off(cfg, create):
    """The cache's directory, or the answer that says why it is not used."""
    if not cfg.cache:
        return None, {"enabled": False, "why": "the site's allowlist turns the cache off"}
    cache, why = _cache_dir(cfg, create)
    return cache, {"enabled": False, "why": why}


def cmd_cache_place(cfg, args, journal):
    _arguments(args, "cache-place RUN_ID (the files as JSON on stdin)", 1, 1)
    run = _existing_run(cfg, args[0])
    files = _cache_request(cfg, True)[0]
    _inputs_may_change(run)
    cache, off = _cache_off(cfg, False)
    if cache is None:  # (no cache yet: nothing to place, cache-insert makes it)
        _print_json(off if off["why"] else {"enabled": True, "placed": [], "changed": []})
        return EXIT_OK
    placed, changed = [], []
    for name, parts, size, digest, mtime_ns in files:
        try:
            verdict = _place(cache, run, name, parts, size, digest, mtime_ns)
        except (OSError, UnicodeError, Refused):  # (this file is sent; a name Python
            #                                          3.6 cannot encode in a C locale)
            verdict = "failed"
        if verdict == "placed":
            placed.append(name)
        elif verdict == "changed":
            changed.append(cache_entry(cache, digest))
    journal.record("ok: cache-place: %d of %d files placed, %d changed entries removed"
                   % (len(placed), len(files), len(changed)))
    _print_json({"enabled": True, "placed": placed, "changed": changed})
    return EXIT_OK


def cmd_cache_insert(cfg, args, journal):
    _arguments(args, "cache-insert RUN_ID (the files as JSON on stdin)", 1, 1)
    run = _existing_run(cfg, args[0])
    files, max_size, max_age, _dry = _cache_request(cfg, True)
    _inputs_may_change(run)
    cache, off = _cache_off(cfg, True)
    if cache is None:
        _print_json(off)
        return EXIT_OK
    verdicts = {}
    for _name, parts, size, digest, _mtime in files:
        try:
            verdict = _insert(cache, run, parts, size, digest)
        except (OSError, UnicodeError, Refused):  # (this file stays out of the cache)
            verdict = "failed"
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
    trimmed = _trim(cache, max_size, max_age, False)
    journal.record("ok: cache-insert: %s; %d entries trimmed" % (
        ", ".join("%d %s" % (n, v) for v, n in sorted(verdicts.items())) or "no files",
        len(trimmed)))
    _print_json({"enabled": True, "inserted": verdicts.get("inserted", 0),
                 "trimmed": trimmed})
    return EXIT_OK


def cmd_cache_trim(cfg, args, journal):
    _arguments(args, "cache-trim (limits as JSON on stdin)", 0, 0)
    _files, max_size, max_age, dry_run = _cache_request(cfg, False)
    cache, off = _cache_off(cfg, False)
    if cache is None:
        _print_json(off)
        return EXIT_OK
    trimmed = _trim(cache, max_size, max_age, dry_run)
    journal.record("ok: cache-trim: %d entries %s" % (
        len(trimmed), "would go" if dry_run else "trimmed"))
    _print_json({"enabled": True, "trimmed": trimmed})
    return EXIT_OK


# --------------------------------------------------------------------------------------
# rsync, confined
# --------------------------------------------------------------------------------------

def _check_rsync_option(opt, sender):
    if opt.startswith("--"):
        name, eq, value = opt.partition("=")
        if not eq and opt in RSYNC_LONG:
            return
        if eq and name in RSYNC_LONG_VALUE:
            if RSYNC_LONG_VALUE[name].fullmatch(value):
                return
            raise Refused("rsync option %s: the value must be a number" % name)
        raise Refused("rsync option %s is not allowed through the remote-exec agent (allowed "
                      "long options: %s, %s)"
                      % (name, ", ".join(sorted(RSYNC_LONG)),
                         ", ".join("%s=N" % n for n in sorted(RSYNC_LONG_VALUE))))
    if opt.startswith("-") and len(opt) > 1:
        letters, sep, capabilities = opt[1:].partition("e")
        if sep and not RSYNC_CAPABILITIES_RE.fullmatch(capabilities):
            raise Refused("rsync's capability string %r is not valid" % capabilities)
        for letter in letters:
            if letter == "K":
                raise Refused("rsync option -K (--keep-dirlinks) is not allowed: it writes "
                              "through symlinked directories")
            if letter == "L":
                if sender:
                    raise Refused("rsync option -L (--copy-links) is not allowed when "
                                  "fetching: it would follow links out of the run directory")
                continue
            if letter not in RSYNC_SHORT:
                raise Refused("rsync option -%s is not allowed through the remote-exec agent "
                              "(allowed: -%sL)" % (letter, "".join(sorted(RSYNC_SHORT))))
        return
    raise Refused("unexpected rsync argument %r before '.'" % opt)


def _rsync_path(cfg, raw):
    """(run, components below the run directory, trailing slash) of one rsync path."""
    if not raw:
        raise Refused("an empty rsync path is not allowed; give RUN_ID/ or a path inside it")
    if raw.startswith("/") or raw.startswith("~"):
        raise Refused("rsync path %r is absolute; give RUN_ID/ or a path inside it" % raw)
    if ".." in raw.split("/"):
        raise Refused("rsync path %r: '..' is not allowed" % raw)
    norm = posixpath.normpath(raw)
    parts = norm.split("/")
    if not parts or parts[0] in ("", ".", ".."):
        raise Refused("rsync path %r must start with a run id: RUN_ID/..." % raw)
    if not RUN_ID_RE.fullmatch(parts[0]):
        raise Refused("rsync path %r must start with a run id (a lowercase UUID): RUN_ID/..."
                      % raw)
    run = _existing_run(cfg, parts[0])
    return run, parts[1:], raw.endswith("/")


def _fetch_lock(run):
    fd = os.open(run.ctl("outbox.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    deadline = time.monotonic() + FETCH_LOCK_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            if time.monotonic() >= deadline:
                os.close(fd)
                raise Refused("another fetch of run %s is under way; try again when it ends"
                              % run.id) from None
            time.sleep(POLL_SECONDS)
    os.set_inheritable(fd, True)  # rsync holds the lock while it serves the outbox
    return fd


def build_run_outbox(cfg, run):
    """Fill ``<state>/<RUN_ID>/outbox`` with what of the run may come back: the launched
    entrypoint's ``returns`` (everything if none was launched) and the allowlist's
    ``never`` / ``only`` (see :func:`build_outbox`), but, for a run the agent launched,
    the inputs it left unchanged (the client has them). What a fetch serves, and what
    the pull method's poller uploads. Returns ``(outbox, report)``; hold :func:`_fetch_lock`
    while using it."""
    outbox = run.ctl("outbox")
    entry = cfg.entrypoints.get(_read_text(run.ctl("entrypoint_name")) or "")
    returns = entry.returns if entry is not None else list(RETURN_ALL)
    staged = None
    try:
        with open(run.ctl(STAGED_FILE), "rb") as f:
            staged = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        pass  # (a run launched by an older agent, or not through launch: all comes back)
    try:
        return outbox, build_outbox(run.dir, outbox, returns, cfg.never, cfg.only,
                                    staged if isinstance(staged, dict) else None)
    except OSError as exc:
        raise Failure("cannot prepare the results of run %s: %s: %s"
                      % (run.id, exc.filename, exc.strerror or exc)) from None


def cmd_rsync(cfg, args, journal):
    if len(args) < 1 or args[0] != "--server":
        raise Refused("only rsync's server side is available (rsync --server ...), confined "
                      "to one run directory")
    i = 1
    sender = i < len(args) and args[i] == "--sender"
    if sender:
        i += 1
    options = []
    while i < len(args) and args[i] != ".":
        _check_rsync_option(args[i], sender)
        options.append(args[i])
        i += 1
    if i >= len(args):
        raise Refused("rsync's arguments lack the '.' before the paths")
    raws = args[i + 1:]
    if not raws:
        raise Refused("rsync gave no path; give RUN_ID/ or a path inside it")
    if not sender and len(raws) != 1:
        raise Refused("rsync may write to exactly one path: RUN_ID/ or a path inside it")
    targets = [_rsync_path(cfg, raw) for raw in raws]
    rsync = shutil.which("rsync")
    if not rsync:
        raise Refused(RSYNC_MISSING)

    mapped = []
    if sender:
        built = {}
        for run, sub, trailing in targets:
            if not sub and not trailing:
                raise Refused("fetch %s/ (with a trailing slash) or paths inside it"
                              % run.id)
            outbox = run.ctl("outbox")
            if run.id not in built:
                _fetch_lock(run)
                built[run.id] = build_run_outbox(cfg, run)[1]
            if sub:
                mapped.append(os.path.join(outbox, *sub) + ("/" if trailing else ""))
            else:
                mapped.append(outbox + "/")
        summary = "; ".join("%s: %d files, %d skipped, %d unchanged inputs"
                            % (rid, b["files"], len(b["skipped"]), b.get("unchanged", 0))
                            for rid, b in built.items())
    else:
        run, sub, trailing = targets[0]
        _inputs_may_change(run)
        run_member(run, sub)
        mapped.append(os.path.join(run.dir, *sub) + ("/" if trailing else ""))
        if "--munge-links" not in options:
            options.append("--munge-links")
        summary = run.id
    argv = (["rsync", "--server"] + (["--sender"] if sender else []) + options + ["."]
            + mapped)
    os.chdir(cfg.root)
    journal.record("ok: rsync %s (%s)" % ("sender" if sender else "receiver", summary))
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        os.execv(rsync, argv)  # noqa: S606 - an argv list, no shell
    except OSError as exc:
        journal.done = False
        raise Failure("cannot run rsync (%s): %s" % (rsync, exc.strerror or exc)) from None


# --------------------------------------------------------------------------------------
# Entry
# --------------------------------------------------------------------------------------

COMMANDS = {
    "hello": cmd_hello,
    "create": cmd_create,
    "status": cmd_status,
    "launch": cmd_launch,
    "wait": cmd_wait,
    "log": cmd_log,
    "cancel": cmd_cancel,
    "remove": cmd_remove,
    "list": cmd_list,
    "token": cmd_token,
    "cache-place": cmd_cache_place,
    "cache-insert": cmd_cache_insert,
    "cache-trim": cmd_cache_trim,
    "rsync": cmd_rsync,
}


class Journal:
    """The agent log: one line per invocation (never a parameter value)."""

    def __init__(self, path, command):
        self.path = path
        self.command = command
        self.verdict = None
        self.done = False
        #: who asked (the SSH client's address; None: from SSH_CONNECTION)
        self.client = None

    def record(self, verdict, details=None):
        if self.done:
            return
        self.done = True
        self.write(verdict, details)

    def write(self, verdict, details=None):
        """One line, whether or not this invocation's verdict was recorded already."""
        shown = repr(self.command)
        if len(shown) > 300:
            shown = shown[:297] + "..."
        client = self.client or (os.environ.get("SSH_CONNECTION") or "-").split(" ")[0] or "-"
        client = re.sub(r"[^0-9A-Za-z.:%_-]", "?", client)[:64]
        line = "%s pid=%d from=%s command=%s %s\n" % (
            _now_iso(), os.getpid(), client, shown, verdict.replace("\n", " "))
        if details:
            line += "".join("    | %s\n" % d for d in details.rstrip("\n").split("\n"))
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                         0o600)
            try:
                _write_all(fd, line.encode("utf-8", "replace"))
            finally:
                os.close(fd)
        except OSError:
            pass  # a log that cannot be written never fails the request


def _say(text):
    try:
        sys.stderr.write(SAY_PREFIX + text.replace("\n", " ") + "\n")
        sys.stderr.flush()
    except OSError:
        pass


#: ``mark NONCE REQUEST``: the client's framing. The agent prints NONCE on a line of
#: its own on stdout and stderr before anything else, so the client can tell the
#: login shell's start-up output (a .bashrc that prints) from the agent's answer.
MARK_WORD = "mark"
MARK_NONCE = re.compile(r"[A-Za-z0-9_.-]{8,80}\Z")


def strip_mark(command):
    """``command`` without its mark, after printing the mark; as it was if unmarked."""
    words = (command or "").split(None, 2)
    if len(words) < 2 or words[0] != MARK_WORD or not MARK_NONCE.match(words[1]):
        return command
    for stream in (sys.stdout, sys.stderr):
        stream.write(words[1] + "\n")
        stream.flush()
    return words[2] if len(words) > 2 else ""


def dispatch(cfg, command, journal):
    """Run one client request; returns the exit status (or raises Refused / Failure)."""
    if command is None:
        raise Refused(ONLY_AGENT)
    first = command.split()[0] if command.split() else ""
    if first == "internal-sftp" or first.endswith("sftp-server"):
        raise Refused(SFTP_REFUSAL)
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise Refused("the command line cannot be parsed (%s); %s" % (exc, ONLY_AGENT)) from None
    if not argv:
        raise Refused(ONLY_AGENT)
    handler = COMMANDS.get(argv[0])
    if handler is None:
        shown = argv[0] if len(argv[0]) <= 80 else argv[0][:80] + "..."
        raise Refused("%r is not an agent command; %s" % (shown, ONLY_AGENT))
    return handler(cfg, argv[1:], journal)


def _serve(allowlist, command, journal, batch_job=None):
    """Load the allowlist, then run the client's ``command`` (or, with ``batch_job``,
    that run's batch job); the exit status."""
    try:
        cfg = Config(allowlist)
        journal.path = cfg.log
        cfg.load()
        journal.path = cfg.log
        if batch_job is not None:
            code = run_batch_job(cfg, batch_job, journal)
        else:
            code = dispatch(cfg, command, journal)
        journal.record(journal.verdict or ("ok" if code == EXIT_OK else "exit %d" % code))
        return code
    except Refused as exc:
        _say("refused: %s" % exc)
        journal.record("refused: %s" % exc.logged)
        return EXIT_REFUSED
    except AlreadyLaunched:
        _say("this run was already launched")
        journal.record("refused: this run was already launched (exit %d)"
                       % EXIT_ALREADY_LAUNCHED)
        return EXIT_ALREADY_LAUNCHED
    except Failure as exc:
        _say("error: %s" % exc)
        journal.record("error: %s" % exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        journal.record("error: interrupted")
        return 130
    except BrokenPipeError:
        journal.record("error: the client closed its side of the channel")
        try:  # nothing more can reach the client; keep the interpreter's exit quiet
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        except OSError:
            pass
        return EXIT_FAILURE
    except Exception as exc:  # never a traceback to the client
        journal.record("error: internal error: %s: %s" % (type(exc).__name__, exc),
                       traceback.format_exc())
        _say("error: internal error (%s); the details are in the agent log"
             % type(exc).__name__)
        return EXIT_FAILURE


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    allowlist = None
    batch_job = None
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--version":
            print("%s %s" % (AGENT_NAME, AGENT_VERSION))
            return EXIT_OK
        if word == "--allowlist" and i + 1 < len(argv):
            allowlist = argv[i + 1]
            i += 2
            continue
        if word.startswith("--allowlist="):
            allowlist = word[len("--allowlist="):]
            i += 1
            continue
        if word == "--batch-job" and i + 1 < len(argv) and batch_job is None:
            batch_job = argv[i + 1]
            i += 2
            continue
        _say("error: unknown agent option %r (the forced command takes only --allowlist PATH "
             "and --version; a batch job --batch-job RUN_ID)" % word)
        return EXIT_FAILURE
    if allowlist is None:
        allowlist = os.path.join(os.path.dirname(os.path.abspath(__file__)), "allowlist.json")
    allowlist = os.path.abspath(os.path.expanduser(allowlist))
    if batch_job is not None:  # (a batch job's own process; run_batch_job refuses SSH)
        command = "--batch-job " + batch_job
    else:
        command = strip_mark(os.environ.get("SSH_ORIGINAL_COMMAND"))
    journal = Journal(os.path.join(os.path.dirname(allowlist), "agent.log"), command)
    if batch_job is not None:
        journal.client = "-"  # (no SSH client: a job the scheduler started)
    return _serve(allowlist, command, journal, batch_job)


if __name__ == "__main__":
    sys.exit(main())
