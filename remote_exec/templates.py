"""Entrypoint templates: loading, typed parameters, and rendering with quoting on by default.

A template is a directory ``templates/NAME/`` holding ``template.yaml`` (what it
does, its parameters, what it returns) and ``entrypoint.sh.j2`` (a POSIX sh script,
Jinja2). Every ``{{ value }}`` is shell-quoted when rendered; a template author must
write ``{{ value | raw }}`` to opt out, so a parameter can never become shell syntax
by accident. Undefined names are errors (StrictUndefined), and so is writing an
optional parameter that has no value (guard it with ``{% if x is not none %}``).

``template.yaml`` has three keys, and no others:

``description``
    one line, shown by ``remote-exec templates``.
``parameters``
    a mapping from parameter name (a Jinja2 identifier) to its declaration.
``returns``
    a list of glob patterns, relative to the run directory, naming the files the run
    produces that should come back to MInt (``**`` matches across directories). The
    default, ``["**"]``, means everything in the run directory, as the legacy flow did.
    Patterns must be relative and must not contain a ``..`` component.

Parameter types:

``string``   any text (no newline, carriage return or NUL byte, as for every type);
``int``, ``float``  numbers; ``min`` and ``max`` bound them;
``bool``     ``true/false``, ``yes/no``, ``on/off``, ``1/0``;
``choice``   one of ``choices:``;
``path``     a site-side path; a leading ``~/`` expands to the remote home; no ``..``;
``file``     a file in the run directory (typically a staged input or one the run
             builds): a relative path with no ``..`` component, not starting with ``-``;
``list``     repeat ``--param NAME=VALUE``; ``items:`` is the type of each element
             (default ``string``; any type above), e.g. ``items: file``.

Each may have ``default``, ``required``, ``pattern`` (a regular expression the whole
value, or each element of a list, must match), ``description``, and for ``int`` and
``float`` (or lists of them) ``min`` / ``max``. Defaults are checked like given values
when the template is loaded.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remote_exec.errors import ConfigError
from remote_exec.paths import shipped_dir

TYPES = ("string", "int", "float", "bool", "choice", "path", "file", "list")
#: what a list's elements may be
ITEM_TYPES = tuple(t for t in TYPES if t != "list")
PARAMETER_KEYS = frozenset({
    "type", "items", "required", "default", "pattern", "choices", "min", "max", "description",
})
TEMPLATE_KEYS = frozenset({"description", "parameters", "returns"})
#: everything in the run directory
RETURN_ALL = ["**"]
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Raw(str):
    """A string a template inserts verbatim (``{{ x | raw }}``)."""


class RemotePath(str):
    """A site-side path; quoted so that a leading ``~/`` still means the remote home."""

    def shell(self) -> str:
        if self == "~":
            return '"$HOME"'
        if self.startswith("~/"):
            return '"$HOME"/' + shlex.quote(self[2:])
        return shlex.quote(self)


def shell_quote(value: Any) -> str:
    """How a value appears in rendered shell text unless marked raw."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, RemotePath):
        return value.shell()
    if value is None:
        raise ConfigError(
            "an optional parameter with no value was written into the script "
            "(the template must guard it with {% if NAME is not none %})"
        )
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, tuple)):
        return " ".join(shell_quote(v) for v in value)
    return shlex.quote(str(value))


def check_run_file(raw: str, where: str) -> str:
    """A path inside the run directory, or ConfigError: relative, no ``..``, no leading ``-``."""
    if not raw:
        raise ConfigError(f"{where}: a file name must not be empty")
    if raw.startswith("/"):
        raise ConfigError(f"{where}: {raw!r} is absolute; give a path inside the run directory")
    if ".." in raw.split("/"):
        raise ConfigError(f"{where}: {raw!r}: '..' is not allowed in file names")
    if raw.startswith("-"):
        raise ConfigError(f"{where}: {raw!r} starts with '-' and would be read as an option")
    return raw


def check_return_pattern(pattern: Any, where: str) -> str:
    """A ``returns:`` glob pattern, or ConfigError: relative, no ``..`` component."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{where}: every pattern must be a non-empty string, not {pattern!r}")
    if any(c in pattern for c in "\n\r\x00"):
        raise ConfigError(f"{where}: {pattern!r}: newlines and NUL bytes are not allowed")
    if pattern.startswith(("/", "~")):
        raise ConfigError(f"{where}: {pattern!r} must be relative to the run directory")
    if ".." in pattern.split("/"):
        raise ConfigError(f"{where}: {pattern!r}: '..' is not allowed")
    return pattern


@dataclass
class Parameter:
    name: str
    type: str = "string"
    required: bool = False
    default: Any = None
    pattern: str | None = None
    choices: list[str] = field(default_factory=list)
    description: str = ""
    items: str = "string"
    min: float | None = None
    max: float | None = None

    @property
    def kind(self) -> str:
        """The type of one value: the element type for a list."""
        return self.items if self.type == "list" else self.type

    @property
    def label(self) -> str:
        """The type as shown to people: ``list[file]`` for a list of files."""
        return f"list[{self.items}]" if self.type == "list" else self.type

    def convert(self, raw: str) -> Any:
        """Turn one command-line value (one element, for a list) into its type, or raise."""
        where = f"parameter {self.name!r}"
        if "\n" in raw or "\r" in raw or "\x00" in raw:
            raise ConfigError(f"{where}: newlines and NUL bytes are not allowed in values")
        if self.type == "list" and not raw:
            raise ConfigError(f"{where}: an empty element is not allowed in a list "
                              "(the entrypoint gets a list one element per line)")
        if self.pattern and not re.fullmatch(self.pattern, raw):
            raise ConfigError(f"{where}: {raw!r} does not match the pattern {self.pattern!r}")
        kind = self.kind
        if kind in ("int", "float"):
            try:
                number: float = int(raw) if kind == "int" else float(raw)
            except ValueError:
                raise ConfigError(f"{where}: {raw!r} is not a valid {kind}") from None
            if number != number or number in (float("inf"), float("-inf")):
                raise ConfigError(f"{where}: {raw!r} is not a finite number")
            if self.min is not None and number < self.min:
                raise ConfigError(f"{where}: {raw} is less than the minimum {self.min:g}")
            if self.max is not None and number > self.max:
                raise ConfigError(f"{where}: {raw} is more than the maximum {self.max:g}")
            return number
        if kind == "bool":
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ConfigError(f"{where}: {raw!r} is not a boolean (use true or false)")
        if kind == "choice" and raw not in self.choices:
            raise ConfigError(f"{where}: {raw!r} is not one of {', '.join(self.choices)}")
        if kind == "path":
            if ".." in raw.split("/"):
                raise ConfigError(f"{where}: '..' is not allowed in paths")
            return RemotePath(raw)
        if kind == "file":
            return check_run_file(raw, where)
        return raw

    def checked_default(self, where: str) -> Any:
        """The default, converted and validated like a given value (None: no default)."""
        if self.default is None:
            return [] if self.type == "list" else None
        if self.type == "list":
            if not isinstance(self.default, list):
                raise ConfigError(f"{where}: the default of a list must be a list")
            return [self.convert(_as_text(v)) for v in self.default]
        return self.convert(_as_text(self.default))


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass
class Template:
    name: str
    directory: Path
    description: str
    parameters: dict[str, Parameter]
    source: str
    returns: list[str] = field(default_factory=lambda: list(RETURN_ALL))

    def bind(self, pairs: list[str]) -> dict[str, Any]:
        """Validate ``KEY=VALUE`` pairs against the declared parameters."""
        values: dict[str, Any] = {}
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            if not sep:
                raise ConfigError(f"--param {pair!r}: expected KEY=VALUE")
            param = self.parameters.get(key)
            if param is None:
                known = ", ".join(sorted(self.parameters)) or "none"
                raise ConfigError(
                    f"template {self.name!r} has no parameter {key!r} (parameters: {known})"
                )
            value = param.convert(raw)
            if param.type == "list":
                values.setdefault(key, []).append(value)
            elif key in values:
                raise ConfigError(f"parameter {key!r} given twice")
            else:
                values[key] = value
        for name, param in self.parameters.items():
            if name in values:
                continue
            if param.required:
                raise ConfigError(
                    f"template {self.name!r} needs --param {name}=... ({param.description})"
                )
            default = param.default  # already converted by load_template
            values[name] = list(default) if isinstance(default, list) else default
        return values

    def render(self, values: dict[str, Any]) -> str:
        """The entrypoint script for these (already validated) values: the body, with
        a prologue that sets ``RE_<name>`` for every parameter after its first line."""
        missing = [name for name in self.parameters if name not in values]
        if missing:
            raise ConfigError(f"template {self.name!r} failed to render: no value for "
                              f"{', '.join(missing)}")
        body = self._render(values)
        prologue = "".join(env_assignment(name, values[name]) for name in self.parameters)
        if body.startswith("#!"):
            first, newline, rest = body.partition("\n")
            return first + newline + prologue + rest
        return prologue + body

    def render_body(self) -> str:
        """The script with no parameter values: what a restricted site approves, pins by
        sha256 and runs with the parameters in the environment. A template that writes
        a parameter into its text cannot be approved."""
        try:
            return self._render({})
        except ConfigError as exc:
            raise ConfigError(
                f"{exc.message}; an approved entrypoint must read its parameters from the "
                "environment ($RE_<name>) instead of writing {{ name }} into the script",
            ) from None

    def _render(self, values: dict[str, Any]) -> str:
        import jinja2

        env = jinja2.Environment(
            undefined=jinja2.StrictUndefined,
            finalize=shell_quote,
            autoescape=False,  # noqa: S701 - the output is shell text, quoted by finalize
            keep_trailing_newline=True,
        )
        env.filters["raw"] = lambda v: Raw(v)
        try:
            return env.from_string(self.source).render(**values)
        except jinja2.TemplateError as exc:
            raise ConfigError(f"template {self.name!r} failed to render: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"template {self.name!r} failed to render: {exc}") from None

    def declarations(self) -> dict[str, dict[str, Any]]:
        """The parameters as plain data (the agent's allowlist validates runs with it)."""
        out: dict[str, dict[str, Any]] = {}
        for p in self.parameters.values():
            spec: dict[str, Any] = {"type": p.type, "required": p.required}
            if p.type == "list":
                spec["items"] = p.items
            for key in ("pattern", "min", "max"):
                if getattr(p, key) is not None:
                    spec[key] = getattr(p, key)
            if p.choices:
                spec["choices"] = list(p.choices)
            if p.default is not None and p.default != []:
                spec["default"] = _wire(p.default)
            elif p.type == "list":
                spec["default"] = []
            out[p.name] = spec
        return out

    def describe(self) -> str:
        """What ``remote-exec templates NAME`` shows: parameters, types, defaults, returns."""
        lines = [f"{self.name}: {self.description}", "parameters:"]
        for p in self.parameters.values():
            if p.required:
                extra = " (required)"
            elif p.default is None or p.default == []:
                extra = " (optional)"
            else:
                extra = f" (default: {_as_text(_plain(p.default))})"
            lines.append(f"  {p.name:12} {p.label:12}{extra}  {p.description}")
            details = []
            if p.choices:
                details.append(f"one of {', '.join(p.choices)}")
            if p.min is not None:
                details.append(f"min {p.min:g}")
            if p.max is not None:
                details.append(f"max {p.max:g}")
            if p.pattern:
                details.append(f"pattern {p.pattern}")
            if details:
                lines.append(f"  {'':12} {'':12}  ({'; '.join(details)})")
        lines.append(f"returns: {' '.join(self.returns)}")
        return "\n".join(lines)


def env_name(name: str) -> str:
    """The environment variable that carries parameter ``name`` to the entrypoint."""
    return f"RE_{name}"


def env_assignment(name: str, value: Any) -> str:
    """Prologue lines setting ``RE_<name>`` (quoted) or unsetting it (no value).

    A list is its elements one per line (values never hold a newline), a bool ``1``
    or ``0``, a site path starting with ``~/`` is taken from the remote home.
    """
    var = env_name(name)
    if value is None:
        return f"unset {var}\n"
    if isinstance(value, (list, tuple)):
        for item in value:
            if not str(item) or any(c in str(item) for c in "\n\r\x00"):
                raise ConfigError(f"parameter {name!r}: list element {str(item)!r} is empty "
                                  "or holds a line break, which a list cannot carry")
        text = "'\n'".join(shell_quote(v) for v in value) if value else "''"
    else:
        text = shell_quote(value)
    return f"{var}={text}\nexport {var}\n"


def _wire(value: Any) -> Any:
    """A converted value as the text (or list of texts) the user would have typed."""
    if isinstance(value, list):
        return [_wire(v) for v in value]
    return _as_text(value)


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return value


def templates_dir() -> Path:
    env = os.environ.get("REMOTE_EXEC_TEMPLATES")
    return Path(env) if env else shipped_dir("templates")


def available() -> list[str]:
    base = templates_dir()
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if (p / "template.yaml").is_file())


def _parameter(spec_file: Path, pname: Any, pspec: Any) -> Parameter:
    where = f"{spec_file}: parameter {pname!r}"
    if not isinstance(pname, str) or not _IDENTIFIER.fullmatch(pname):
        hint = " (YAML reads a bare on/off/yes/no as a boolean: quote it)" if isinstance(
            pname, bool) else ""
        raise ConfigError(f"{where}: a parameter name must be a letter or _ then letters, "
                          f"digits or _{hint}")
    if pspec is None:
        pspec = {}
    if not isinstance(pspec, dict):
        raise ConfigError(f"{where}: expected a mapping of type, default, pattern, ...")
    unknown = set(pspec) - PARAMETER_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} "
                          f"(known: {', '.join(sorted(PARAMETER_KEYS))})")
    ptype = pspec.get("type", "string")
    if ptype not in TYPES:
        raise ConfigError(f"{where}: type must be one of {', '.join(TYPES)}")
    if "items" in pspec:
        if ptype != "list":
            raise ConfigError(f"{where}: 'items' is only for type list")
        if pspec["items"] not in ITEM_TYPES:
            raise ConfigError(f"{where}: items must be one of {', '.join(ITEM_TYPES)}")
    param = Parameter(name=pname, **pspec)
    if param.kind == "choice":
        if not param.choices or not all(isinstance(c, str) for c in param.choices):
            raise ConfigError(f"{where}: a choice needs a non-empty list of strings in 'choices'")
    elif "choices" in pspec:
        raise ConfigError(f"{where}: 'choices' is only for type choice")
    for bound in ("min", "max"):
        value = pspec.get(bound)
        if value is None:
            continue
        if param.kind not in ("int", "float"):
            raise ConfigError(f"{where}: {bound!r} is only for int and float")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {bound!r} must be a number")
    if param.pattern is not None:
        try:
            re.compile(str(param.pattern))
        except re.error as exc:
            raise ConfigError(f"{where}: pattern {param.pattern!r} is not valid: {exc}") from None
    param.default = param.checked_default(where)
    return param


def load_template(name: str) -> Template:
    """Load and check ``templates/NAME``."""
    import yaml

    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"invalid template name {name!r}")
    directory = templates_dir() / name
    spec_file = directory / "template.yaml"
    script_file = directory / "entrypoint.sh.j2"
    if not spec_file.is_file() or not script_file.is_file():
        raise ConfigError(
            f"no template {name!r} in {templates_dir()}",
            hint=f"available templates: {', '.join(available()) or 'none'}",
        )
    try:
        spec = yaml.safe_load(spec_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{spec_file}: not valid YAML: {exc}") from None
    if not isinstance(spec, dict):
        keys = ", ".join(sorted(TEMPLATE_KEYS))
        raise ConfigError(f"{spec_file}: expected a mapping with {keys}")
    unknown = set(spec) - TEMPLATE_KEYS
    if unknown:
        raise ConfigError(f"{spec_file}: unknown keys {sorted(unknown)} "
                          f"(known: {', '.join(sorted(TEMPLATE_KEYS))})")
    pspecs = spec.get("parameters") or {}
    if not isinstance(pspecs, dict):
        raise ConfigError(f"{spec_file}: 'parameters' must be a mapping")
    params = {str(p): _parameter(spec_file, p, s) for p, s in pspecs.items()}
    returns = spec.get("returns", RETURN_ALL)
    if not isinstance(returns, list) or not returns:
        raise ConfigError(f"{spec_file}: 'returns' must be a non-empty list of glob patterns")
    returns = [check_return_pattern(p, f"{spec_file}: returns") for p in returns]
    return Template(
        name=name, directory=directory, description=str(spec.get("description", "")),
        parameters=params, source=script_file.read_text(encoding="utf-8"), returns=returns,
    )
