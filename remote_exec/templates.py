"""Entrypoint templates: loading, typed parameters, and rendering with quoting on by default.

A template is a directory ``templates/NAME/`` holding ``template.yaml`` (what it
does, its parameters) and ``entrypoint.sh.j2`` (a POSIX sh script, Jinja2). Every
``{{ value }}`` is shell-quoted when rendered; a template author must write
``{{ value | raw }}`` to opt out, so a parameter can never become shell syntax by
accident. Undefined names are errors (StrictUndefined).

Parameter types: ``string``, ``int``, ``float``, ``bool``, ``choice`` (``choices:``),
``path`` (a site-side path; a leading ``~/`` expands to the remote home),
``list`` (repeat ``--param NAME=VALUE``). Each may have ``default``, ``required``,
``pattern`` (a regular expression the whole value must match) and ``description``.
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

TYPES = ("string", "int", "float", "bool", "choice", "path", "list")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


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
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, tuple)):
        return " ".join(shell_quote(v) for v in value)
    return shlex.quote(str(value))


@dataclass
class Parameter:
    name: str
    type: str = "string"
    required: bool = False
    default: Any = None
    pattern: str | None = None
    choices: list[str] = field(default_factory=list)
    description: str = ""

    def convert(self, raw: str) -> Any:
        """Turn one command-line value into this parameter's type, or raise ConfigError."""
        where = f"parameter {self.name!r}"
        if "\n" in raw or "\r" in raw or "\x00" in raw:
            raise ConfigError(f"{where}: newlines and NUL bytes are not allowed in values")
        if self.pattern and not re.fullmatch(self.pattern, raw):
            raise ConfigError(f"{where}: {raw!r} does not match the pattern {self.pattern!r}")
        try:
            if self.type == "int":
                return int(raw)
            if self.type == "float":
                return float(raw)
        except ValueError:
            raise ConfigError(f"{where}: {raw!r} is not a valid {self.type}") from None
        if self.type == "bool":
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ConfigError(f"{where}: {raw!r} is not a boolean (use true or false)")
        if self.type == "choice" and raw not in self.choices:
            raise ConfigError(f"{where}: {raw!r} is not one of {', '.join(self.choices)}")
        if self.type == "path":
            if ".." in raw.split("/"):
                raise ConfigError(f"{where}: '..' is not allowed in paths")
            return RemotePath(raw)
        return raw


@dataclass
class Template:
    name: str
    directory: Path
    description: str
    parameters: dict[str, Parameter]
    source: str

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
            default = param.default
            if param.type == "list":
                default = list(default or [])
            elif param.type == "path" and default is not None:
                default = RemotePath(default)
            values[name] = default
        return values

    def render(self, values: dict[str, Any]) -> str:
        """The entrypoint script for these (already validated) values."""
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


def templates_dir() -> Path:
    env = os.environ.get("REMOTE_EXEC_TEMPLATES")
    return Path(env) if env else shipped_dir("templates")


def available() -> list[str]:
    base = templates_dir()
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if (p / "template.yaml").is_file())


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
    params: dict[str, Parameter] = {}
    for pname, pspec in (spec.get("parameters") or {}).items():
        pspec = dict(pspec or {})
        if pspec.get("type", "string") not in TYPES:
            raise ConfigError(f"{spec_file}: parameter {pname!r}: type must be one of {TYPES}")
        unknown = set(pspec) - {"type", "required", "default", "pattern", "choices", "description"}
        if unknown:
            raise ConfigError(f"{spec_file}: parameter {pname!r}: unknown keys {sorted(unknown)}")
        params[pname] = Parameter(name=pname, **pspec)
    return Template(
        name=name, directory=directory, description=str(spec.get("description", "")),
        parameters=params, source=script_file.read_text(encoding="utf-8"),
    )
