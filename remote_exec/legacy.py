"""MInt's old argument form: ``client_name:HOST client_cmd:CMD client_files:a,b,c``.

Behaves like ``execute_remote_command.sample.py`` from misrc_remote_workflow: the
command runs in a fresh remote directory with the listed files, the whole directory
comes back into the current directory, and the exit code is 0 on success and 1 on
any failure. Additions a module may rely on (all from the .sh variant of the script):

* ``solver_logs/solver_execute.log`` under ``<base>/<$MISYSTEM_SITEID>/`` gets
  ``YYYY-MM-DD HH:MM:SS: start|normal end|abnormal end: <solver>: unknown`` lines
  when ``$MISYSTEM_SITEID`` is set (``<base>`` defaults to
  ``/home/misystem/assets/workflow``; ``legacy.solver_log_base`` in the configuration
  or ``$REMOTE_EXEC_SOLVER_LOG_BASE`` changes it);
* on failure the remote log is printed between
  ``---------- remote side log ----------------`` lines.

The original passed ``client_files`` and ``client_cmd`` through the local shell of the
MInt host; :func:`expand_files` and :func:`expand_command` give the same result without
a shell (every remaining difference is listed in the README's MInt section):

* ``client_files``: names are separated by commas and/or whitespace; ``~``, ``~user``,
  ``$VAR`` and ``${VAR}`` are expanded, then globs (sorted, like sh); an unmatched glob
  or an unset variable is an error naming it; ``DIR/`` stages the directory's contents
  (rsync's trailing slash) as one input per entry;
* ``client_cmd``: ``$VAR``, ``${VAR}``, ``${VAR:-word}``, ``${VAR-word}`` and ``$$``
  are expanded on the MInt side and the values sent quoted, so the remote shell sees
  the words the original's local shell made; ``\\$`` leaves an expansion to the remote
  shell (as the original's local shell did); single-quoted text and comments stay as
  written; command substitution, arithmetic and the other special parameters
  are refused with what to write instead (running a module's argument string as local
  commands is not safe, and changing where it runs would change its meaning silently).

Unlike the original, a value may itself contain ``:`` (only the first one splits).
"""

from __future__ import annotations

import datetime as _dt
import glob
import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from remote_exec.errors import ConfigError, InputError
from remote_exec.ssh.words import quote

if TYPE_CHECKING:
    from remote_exec.config import Site
    from remote_exec.request import RunRequest

LOG_MARKER = "---------- remote side log ----------------"
USAGE = """\
Remote execution (drop-in for execute_remote_command.sample.py)
Usage:
  remote-exec legacy client_name:HOST client_cmd:CMD client_files:FILE[,FILE...]
  Options:
     client_name  : the SSH host: an address, a host name, a ~/.ssh/config alias,
                    or a site of the remote-exec configuration
     client_cmd   : the script or solver to run on the remote side (in the run directory)
     client_files : the files the remote side needs, separated by commas (and/or
                    blanks); ~, $VAR and globs are expanded here, DIR/ means DIR's contents
     solver       : (optional) the solver name written to solver_execute.log
"""


@dataclass
class LegacyArgs:
    client_name: str
    client_cmd: str
    client_files: list[str]
    solver: str


def parse(argv: list[str]) -> LegacyArgs | None:
    """The legacy arguments, or None when one of the three is missing (usage case)."""
    values: dict[str, str] = {}
    for item in argv:
        key, sep, value = item.partition(":")
        if sep and key in ("client_name", "client_cmd", "client_files", "solver"):
            values[key] = value
    if not all(k in values for k in ("client_name", "client_cmd", "client_files")):
        return None
    files = split_files(values["client_files"])
    solver = values.get("solver") or os.environ.get("REMOTE_EXEC_SOLVER") or _solver_name(
        values["client_cmd"]
    )
    return LegacyArgs(values["client_name"], values["client_cmd"], files, solver)


def build(args: LegacyArgs, site: Site, into: Path) -> RunRequest:
    """The run request for ``args`` on ``site``, built like ``run``'s
    (:func:`remote_exec.request.build_request`: the site's `backend` and `resources`,
    every check before connecting). A restricted site runs only what its agent approved:
    ``client_cmd`` naming exactly the site's entrypoint runs that approved entrypoint;
    any other command line is refused (exit 1) with what to run instead."""
    from remote_exec.request import build_request

    command = expand_command(args.client_cmd)
    inputs = expand_files(args.client_files)
    return build_request(site, command=command, inputs=inputs, into=into,
                         command_option="client_cmd")


# -- the original's local shell, without a shell -----------------------------------------------

#: how to write what is refused in client_cmd
_HOW = ("compute the value in the module and pass it (e.g. export it and write $NAME), or "
        "write \\$ to have the remote shell expand it there")
_HOW_RUN = ("run the command in the module and pass its output (e.g. export it and write "
            "$NAME), or write \\$(...) or \\`...\\` to have the remote shell run it in the "
            "run directory")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_IFS = " \t\n"
_SPECIAL = "?!#*@-0123456789"
_SEPARATORS = set(" \t\n;&|()<>")


def shell_env() -> dict[str, str]:
    """The variables the original's local shell saw: the environment, with ``PWD`` made
    right as sh makes it at start-up (kept when it names the current directory, else
    the current directory), since a caller that is no shell may pass a stale one."""
    env = dict(os.environ)
    cwd = os.getcwd()
    pwd = env.get("PWD", "")
    try:
        if not (os.path.isabs(pwd) and os.path.samefile(pwd, cwd)):
            env["PWD"] = cwd
    except OSError:
        env["PWD"] = cwd
    return env


def _unset(name: str, where: str) -> ConfigError:
    return ConfigError(
        f"{where}: ${name} is not set in the environment",
        hint=f"the original's local shell would have put an empty string there; export "
        f"{name} before calling remote-exec, write ${{{name}:-}} for an empty default, "
        f"or \\${name} to leave it to the remote shell")


def _dollar(text: str, i: int, env: Mapping[str, str], where: str,
            pid: int) -> tuple[str | None, int]:
    """The expansion starting at ``text[i] == "$"``: (its value, the index after it), or
    (None, i + 1) when this ``$`` is a literal one (as sh takes ``$`` before a blank,
    ``/``, ``:``, a quote inside double quotes, or at the end)."""
    rest = text[i + 1:]
    if rest.startswith("(("):
        raise ConfigError(f"{where}: arithmetic expansion $((...)) was done on the MInt host "
                          "by the original's local shell; remote-exec does not evaluate it",
                          hint=_HOW)
    if rest.startswith("("):
        raise ConfigError(
            f"{where}: command substitution $(...) would run a command on the MInt host, as "
            "the original's local shell did; remote-exec does not run local commands from "
            "an argument string", hint=_HOW_RUN)
    if rest.startswith("{"):
        end = rest.find("}")
        if end < 0:
            raise ConfigError(f"{where}: unterminated ${{ (no closing }})")
        inner = rest[1:end]
        match = _NAME.match(inner)
        if not match:
            raise ConfigError(f"{where}: ${{{inner}}} is not supported (only ${{NAME}}, "
                              "${NAME:-word} and ${NAME-word})", hint=_HOW)
        name, op = match.group(), inner[match.end():]
        if op == "":
            if name not in env:
                raise _unset(name, where)
            return env[name], i + 2 + end
        for prefix in (":-", "-"):
            if op.startswith(prefix):
                word = op[len(prefix):]
                if any(c in word for c in "$`'\"\\"):
                    raise ConfigError(f"{where}: the default in ${{{inner}}} must be plain "
                                      "text (no $, `, quotes or \\)", hint=_HOW)
                value = env.get(name)
                if value is None or (prefix == ":-" and value == ""):
                    value = word
                return value, i + 2 + end
        raise ConfigError(f"{where}: ${{{inner}}} is not supported (only ${{NAME}}, "
                          "${NAME:-word} and ${NAME-word})", hint=_HOW)
    match = _NAME.match(rest)
    if match:
        name = match.group()
        if name not in env:
            raise _unset(name, where)
        return env[name], i + 1 + match.end()
    if rest.startswith("$"):
        return str(pid), i + 2
    if rest[:1] and rest[0] in _SPECIAL:
        raise ConfigError(
            f"{where}: ${rest[0]} is a parameter of the original's local shell (whose value "
            "meant nothing to the remote job); remote-exec does not guess one",
            hint=f"write \\${rest[0]} to have the remote shell expand it, or pass the "
            "value from the module")
    return None, i + 1


def _quote(value: str, where: str) -> str:
    """``value`` as one word for the remote login shell (sh and csh alike)."""
    if "\n" in value or "\r" in value:
        raise ConfigError(f"{where}: an expanded value holds a line break, which the remote "
                          f"login shell cannot be given inside a word: {value!r}",
                          hint="pass a value without line breaks")
    return quote(value)


def expand_command(cmd: str, env: Mapping[str, str] | None = None,
                   pid: int | None = None) -> str:
    """``cmd`` with what the original's local shell expanded on the MInt host expanded
    here, each value quoted so that the remote shell reads the same words.

    ``$NAME``, ``${NAME}``, ``${NAME:-word}``, ``${NAME-word}``: from ``env`` (the
    caller's environment, :func:`shell_env`); unset → ConfigError naming it. Unquoted,
    a value is split at blanks into words (sh's field splitting, default IFS), but never globbed or
    re-read as syntax; inside double quotes it stays one word. ``$$``: this process's
    id (the original gave its local shell's). ``\\$`` and ``\\``` reach the remote shell
    as ``$`` and ````` (it expands them there, as after the original's local shell).
    Single-quoted text, other backslash pairs, comments and a ``$`` that starts no
    expansion pass unchanged. ``$(...)``, backticks, ``$((...))``,
    ``$?``/``$1``/…, ``$'...'``/``$"..."`` and expansions after a here-document
    operator are refused with what to write instead. Without any ``$``/backtick the
    command is returned unchanged.
    """
    if "$" not in cmd and "`" not in cmd:
        return cmd
    env = shell_env() if env is None else env
    pid = os.getpid() if pid is None else pid
    where = "client_cmd"
    out: list[str] = []
    i, n = 0, len(cmd)
    in_dq = False
    word_start = True  # outside quotes: the next character begins a word
    heredoc = False
    while i < n:
        c = cmd[i]
        if not in_dq:
            if c == "'":
                end = cmd.find("'", i + 1)
                if end < 0:
                    raise ConfigError(f"{where}: unterminated single quote",
                                      hint="close the quote (as sh would require)")
                out.append(cmd[i:end + 1])
                i, word_start = end + 1, False
                continue
            if c == "\\":
                out.append(_escaped(cmd[i:i + 2]))
                i, word_start = i + 2, False
                continue
            if c == '"':
                in_dq, word_start = True, False
                out.append(c)
                i += 1
                continue
            if c == "#" and word_start:  # a comment: nothing in it is expanded
                end = cmd.find("\n", i)
                end = n if end < 0 else end
                out.append(cmd[i:end])
                i = end
                continue
            if cmd.startswith("<<", i):
                heredoc = True
            if c in _SEPARATORS:
                out.append(c)
                i, word_start = i + 1, True
                continue
        else:
            if c == '"':
                in_dq = False
                out.append(c)
                i += 1
                continue
            if c == "\\":
                out.append(_escaped(cmd[i:i + 2]))
                i += 2
                continue
        if c == "`":
            raise ConfigError(
                f"{where}: command substitution `...` would run a command on the MInt host, "
                "as the original's local shell did; remote-exec does not run local commands "
                "from an argument string", hint=_HOW_RUN)
        if c == "$":
            if not in_dq and cmd[i + 1:i + 2] in ("'", '"'):
                raise ConfigError(f"{where}: ${cmd[i + 1]}...{cmd[i + 1]} quoting is "
                                  "bash's, not sh's; it is not expanded on the MInt side",
                                  hint="write the text in plain single or double quotes")
            value, after = _dollar(cmd, i, env, where, pid)
            if value is not None:
                if heredoc:
                    raise ConfigError(f"{where}: expansions in a here-document are not "
                                      "supported", hint=_HOW)
                piece = _expanded(value, in_dq, where)
                out.append(piece)
                i = after
                word_start = not in_dq and piece.endswith(" ")
                continue
        out.append(c)
        i, word_start = i + 1, False
    if in_dq:
        raise ConfigError(f"{where}: unterminated double quote",
                          hint="close the quote (as sh would require)")
    return "".join(out)


def _escaped(pair: str) -> str:
    """A backslash pair for the remote shell: ``\\$`` and ``\\``` lose the backslash, as
    the original's local shell removed it, so the remote shell expands what follows
    (the original's way to leave an expansion to the remote side); any other pair
    stays as written and means there what sh makes of it."""
    return pair[1] if pair in ("\\$", "\\`") else pair


def _expanded(value: str, in_dq: bool, where: str) -> str:
    """A value as the remote shell must read it to get the original's words."""
    if in_dq:  # one word: leave the double quotes, add it single-quoted, go back in
        return f'"{_quote(value, where)}"' if value else ""
    fields = [f for f in re.split(f"[{_IFS}]+", value) if f]
    text = " ".join(_quote(f, where) for f in fields)
    if value[:1] and value[0] in _IFS:
        text = " " + text
    if value[-1:] and value[-1] in _IFS and fields:
        text += " "
    return text


def split_files(spec: str) -> list[str]:
    """``client_files`` as the original's shell split it: at commas and blanks."""
    return [w for w in re.split(r"[,\s]+", spec) if w]


def expand_files(words: list[str], env: Mapping[str, str] | None = None) -> list[str]:
    """The paths the original's local shell and rsync made of ``words``: ``~`` and
    ``~user``, then ``$NAME``/``${NAME}`` (unset → error), then globs relative to the
    current directory (sorted; no match → error naming the pattern, unless a file has
    that very name, which sh would keep and rsync find), then ``DIR/`` (or
    ``DIR/.``) as the directory's entries. The same file named twice is kept once (rsync
    copies it once); every problem is reported in one InputError."""
    env = shell_env() if env is None else env
    problems: list[str] = []
    paths: list[str] = []
    for word in words:
        try:
            for path in _expand_file_word(word, env):
                paths.extend(_contents(path))
        except ConfigError as err:
            problems.append(err.message.replace("client_files: ", ""))
    if problems:
        raise InputError(
            "cannot expand client_files as the original's shell did:\n  "
            + "\n  ".join(problems),
            hint="nothing was created on the remote host; client_files takes names "
            "separated by commas, with ~, $NAME and globs expanded on the MInt side")
    unique: list[str] = []
    seen: set[tuple[str, str]] = set()
    for path in paths:
        key = (os.path.basename(os.path.abspath(path)), os.path.realpath(path))
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _expand_file_word(word: str, env: Mapping[str, str]) -> list[str]:
    where, raw = "client_files", word
    for bad, what in (("`", "command substitution `...`"), ("$(", "command substitution "
                      "$(...)"), ("'", "a quote"), ('"', "a quote"), ("\\", "a backslash")):
        if bad in word:
            raise ConfigError(f"{where}: {word!r}: {what} is not supported in client_files",
                              hint=_HOW)
    if word.startswith("~"):
        head, sep, tail = word.partition("/")
        home = os.path.expanduser(head)
        if home != head:
            word = home + sep + tail
        elif not os.path.lexists(word):  # sh keeps the word; rsync would not find it
            raise ConfigError(f"{where}: {word!r}: {head} names no user on this host")
    out: list[str] = []
    i = 0
    while i < len(word):
        if word[i] == "$":
            value, after = _dollar(word, i, env, f"{where}: {word!r}", os.getpid())
            if value is not None:
                out.append(value)
                i = after
                continue
        out.append(word[i])
        i += 1
    fields = [f for f in re.split(f"[{_IFS}]+", "".join(out)) if f]
    paths: list[str] = []
    for field in fields:
        if glob.has_magic(field):
            matches = sorted(glob.glob(field))
            if not matches and os.path.lexists(field):
                matches = [field]  # sh keeps an unmatched word, and rsync finds it
            if not matches:
                shown = repr(field) if field == raw else f"{raw!r} (= {field!r})"
                raise ConfigError(f"{where}: no file matches {shown}")
            paths.extend(matches)
        else:
            paths.append(field)
    return paths


def _contents(path: str) -> list[str]:
    """``DIR/`` and ``DIR/.`` as rsync copies them: the directory's entries (sorted),
    each staged under its own name; any other path as it is."""
    if not (path.endswith("/") or path.endswith("/.") or path == "."):
        return [path]
    if not os.path.isdir(path):
        if os.path.exists(path.rstrip("/")):
            raise ConfigError(f"client_files: {path!r}: not a directory (a trailing / "
                              "stages a directory's contents)")
        return [path]  # check_inputs names it as missing
    base = path[:-1] if path.endswith("/.") else path
    if not base.endswith("/"):
        base += "/"
    try:
        return [base + entry for entry in sorted(os.listdir(path))]
    except OSError as exc:
        raise ConfigError(f"client_files: {path!r}: cannot list it: {exc.strerror}") from None


def _solver_name(cmd: str) -> str:
    try:
        words = shlex.split(cmd)
    except ValueError:
        words = cmd.split()
    return os.path.basename(words[0]) if words else "unknown"


class SolverLog:
    """Appends MInt's solver_execute.log lines, when ``$MISYSTEM_SITEID`` is set.

    Lines pair up as MInt reads them: every ``normal end`` or ``abnormal end`` follows a
    ``start`` (:meth:`end` writes the start line first when the run failed before it
    began, as the original wrote ``start`` before its first step)."""

    def __init__(self, base: str, solver: str) -> None:
        self.solver = solver
        self.started = False
        site_id = os.environ.get("MISYSTEM_SITEID")
        base = os.environ.get("REMOTE_EXEC_SOLVER_LOG_BASE", base)
        self.path = (Path(base) / site_id / "solver_logs" / "solver_execute.log"
                     if site_id else None)

    def start(self) -> None:
        if not self.started:
            self.write("start")
            self.started = True

    def end(self, ok: bool) -> None:
        self.start()
        self.write("normal end" if ok else "abnormal end")

    def write(self, what: str) -> None:
        if self.path is None:
            return
        stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(f"{stamp}: {what}: {self.solver}: unknown\n")
        except OSError as exc:
            sys.stderr.write(f"remote-exec: warning: cannot write {self.path}: {exc}\n")


def print_remote_log(text: str) -> None:
    """The legacy failure report on stdout."""
    print(LOG_MARKER)
    if text:
        print(text.rstrip("\n"))
    print(LOG_MARKER)
    sys.stdout.flush()
