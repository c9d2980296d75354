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

A restricted site's agent checks the parameters of the entrypoints it runs by the same
rules, and those rules are written once, in the agent (a standard-library file that
must stay one file): the declarations (:class:`remote_exec_agent.Parameter`), the
values (its ``convert``), the binding of given values and defaults
(``bind_parameters``) and the ``returns`` patterns (``check_pattern``). This module
loads them from there (:mod:`remote_exec.agent_file`) and turns their verdicts into
ConfigErrors.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remote_exec.agent_file import agent_module
from remote_exec.errors import ConfigError
from remote_exec.paths import shipped_dir

TEMPLATE_KEYS = frozenset({"description", "parameters", "returns"})


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


def check_return_pattern(pattern: Any, where: str) -> str:
    """A ``returns:`` glob pattern, or ConfigError: one line, relative, no ``..`` component
    (the agent's ``check_pattern``)."""
    try:
        return str(agent_module().check_pattern(pattern, where))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def return_all() -> list[str]:
    """The default ``returns``: everything in the run directory (``["**"]``)."""
    return list(agent_module().RETURN_ALL)


@dataclass
class Parameter:
    """A template's parameter: its declaration, checked by the agent's rules."""

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
    #: the agent's Parameter for this declaration (made on first use)
    _rules: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def kind(self) -> str:
        """The type of one value: the element type for a list."""
        return self.items if self.type == "list" else self.type

    @property
    def label(self) -> str:
        """The type as shown to people: ``list[file]`` for a list of files."""
        return f"list[{self.items}]" if self.type == "list" else self.type

    def spec(self) -> dict[str, Any]:
        """The declaration as plain data, as an agent's allowlist has it (the default as
        the text a user would type)."""
        spec: dict[str, Any] = {"type": self.type, "required": self.required}
        if self.type == "list":
            spec["items"] = self.items
        for key in ("pattern", "min", "max"):
            if getattr(self, key) is not None:
                spec[key] = getattr(self, key)
        if self.choices:
            spec["choices"] = list(self.choices)
        if self.default is not None and self.default != []:
            spec["default"] = _wire(self.default)
        elif self.type == "list":
            spec["default"] = []
        return spec

    def rules(self) -> Any:
        """The agent's ``Parameter`` for this declaration: the one definition of the rules
        (ConfigError if the declaration breaks them)."""
        if self._rules is None:
            try:
                self._rules = agent_module().Parameter(self.name, self.spec(), "template")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        return self._rules

    def convert(self, raw: str) -> Any:
        """Turn one command-line value (one element, for a list) into its type, or raise."""
        agent = agent_module()
        try:
            value = self.rules().convert(raw)
        except agent.Refused as exc:
            raise ConfigError(str(exc)) from None
        return self.typed(value)

    def typed(self, value: Any) -> Any:
        """A value the agent's rules converted, as the client keeps it: a site path (or a
        list of them) as :class:`RemotePath`, so that ``~/`` means the remote home."""
        if self.kind != "path" or value is None:
            return value
        if isinstance(value, list):
            return [RemotePath(v) for v in value]
        return RemotePath(value)


@dataclass
class Template:
    name: str
    directory: Path
    description: str
    parameters: dict[str, Parameter]
    source: str
    returns: list[str] = field(default_factory=return_all)

    def bind(self, pairs: list[str]) -> dict[str, Any]:
        """Validate ``KEY=VALUE`` pairs against the declared parameters (a list parameter
        is repeated), by the agent's rules; the defaults of those not given."""
        given: dict[str, Any] = {}
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            if not sep:
                raise ConfigError(f"--param {pair!r}: expected KEY=VALUE")
            param = self.parameters.get(key)
            if param is not None and param.type == "list":
                given.setdefault(key, []).append(raw)
            elif key in given:
                raise ConfigError(f"parameter {key!r} given twice")
            else:
                given[key] = raw
        agent = agent_module()
        rules = {name: param.rules() for name, param in self.parameters.items()}
        try:
            values = agent.bind_parameters(rules, given, f"template {self.name!r}")
        except agent.MissingParameter as exc:
            param = self.parameters[exc.parameter]
            raise ConfigError(
                f"template {self.name!r} needs --param {param.name}=... ({param.description})"
            ) from None
        except agent.Refused as exc:
            raise ConfigError(str(exc)) from None
        return {name: self.parameters[name].typed(value) for name, value in values.items()}

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
        return {p.name: p.spec() for p in self.parameters.values()}

    def describe(self) -> str:
        """What ``remote-exec templates NAME`` shows: parameters, types, defaults, returns."""
        lines = [f"{self.name}: {self.description}", "parameters:"]
        for p in self.parameters.values():
            if p.required:
                extra = " (required)"
            elif p.default is None or p.default == []:
                extra = " (optional)"
            else:
                extra = f" (default: {_plain(p.default)})"
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
    return str(agent_module().as_text(value))


def _plain(value: Any) -> str:
    """A default as ``describe`` shows it: the text typed, a list's elements by spaces."""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(agent_module().as_text(value))


def templates_dir() -> Path:
    env = os.environ.get("REMOTE_EXEC_TEMPLATES")
    return Path(env) if env else shipped_dir("templates")


def available() -> list[str]:
    base = templates_dir()
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if (p / "template.yaml").is_file())


def _parameter(spec_file: Path, pname: Any, pspec: Any) -> Parameter:
    """Parameter ``pname`` as ``spec_file`` declares it, checked by the agent's rules."""
    try:
        rules = agent_module().Parameter(pname, pspec, str(spec_file))
    except ValueError as exc:
        hint = " (YAML reads a bare on/off/yes/no as a boolean: quote it)" if isinstance(
            pname, bool) else ""
        raise ConfigError(f"{exc}{hint}") from None
    param = Parameter(
        name=pname, type=rules.type, required=rules.required, pattern=rules.pattern,
        choices=list(rules.choices), description=str((pspec or {}).get("description", "")),
        items=rules.items, min=rules.min, max=rules.max,
    )
    param.default = param.typed(rules.default)
    param._rules = rules
    return param


def load_template(name: str) -> Template:
    """Load and check ``templates/NAME``."""
    import yaml

    # a template becomes an approved entrypoint of that name on a restricted site
    if not agent_module().ENTRYPOINT_NAME_RE.fullmatch(name):
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
    try:
        returns = agent_module().check_patterns(spec.get("returns", return_all()),
                                                f"{spec_file}: returns", False)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return Template(
        name=name, directory=directory, description=str(spec.get("description", "")),
        parameters=params, source=script_file.read_text(encoding="utf-8"), returns=returns,
    )
