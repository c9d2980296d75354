"""The site configuration: where it is looked up, its schema, and the resolved :class:`Site`.

A configuration file is YAML::

    defaults:               # optional, merged under every site
      root: /tmp
    sites:
      lab:
        host: lab-server    # an address or a ~/.ssh/config Host alias
        port: 22
        user: mint
        identity_file: ~/.ssh/id_ed25519
        root: /tmp
        entrypoint: ~/misrc_remote_workflow/scripts/execute_remote-side_program_ssh.sh
        templates: [generic]
        cleanup: on-success
        cache: true             # the content cache under root (README, *The content cache*)
        cache_min_size: 1M      # files from this size are cached
        cache_size: 10G         # least recently used entries go beyond it
        cache_max_age: 30d      # entries unused this long go
        retry_tries: 5          # reconnect attempts when the link drops mid-run
        retry_max_interval: 60  # seconds; backoff doubles from 1 s up to this, with jitter
        stall_timeout: 60       # seconds without a byte from the host: the link is dead
        cancel_grace: 10        # seconds between TERM and KILL when a run is cancelled
        restricted: false       # true: the key only runs the remote-exec agent (site install)
        agent_dir: ~/.remote-exec-agent   # where `site install` puts the agent (remote)
        never_return: []        # patterns never fetched (secret inputs, scratch)
        only_return: []         # if given, only these patterns are fetched
        backend: direct         # or slurm, pbs, torque, pjm: submit to the site's scheduler
        resources:              # a batch job's defaults (each run may override with -R)
          nodes: 1
          walltime: "1:00:00"
          queue: short          # Slurm partition, PBS queue, PJM resource group
    legacy:
      solver_log_base: /home/misystem/assets/workflow

The file is looked up as ``--config``, ``$REMOTE_EXEC_CONFIG``, ``./remote-exec.yaml``,
then ``~/.config/remote-exec/sites.yaml``; the first that exists is used. A site name
that the file does not define is taken as an SSH host (or ``~/.ssh/config`` alias),
exactly as ``ssh NAME`` would.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remote_exec import backends
from remote_exec.backends.scheduler import RESOURCES_SCHEMA
from remote_exec.errors import ConfigError
from remote_exec.paths import state_dir, user_config_file
from remote_exec.sizes import SIZE_HINT, SIZE_SCHEMA, parse_size
from remote_exec.templates import check_return_pattern

DEFAULT_ROOT = "/tmp"
DEFAULT_ENTRYPOINT = "~/misrc_remote_workflow/scripts/execute_remote-side_program_ssh.sh"
DEFAULT_SOLVER_LOG_BASE = "/home/misystem/assets/workflow"
DEFAULT_AGENT_DIR = "~/.remote-exec-agent"
CLEANUP_POLICIES = ("on-success", "always", "never")
TRANSFER_METHODS = ("auto", "rsync", "sftp")
#: the site's content cache (README, *The content cache*): on by default for SSH sites
#: (restricted ones too); files from this size are cached, the cache is trimmed to this
#: size (least recently used first) and entries unused for this long are removed
DEFAULT_CACHE_MIN_SIZE = 1024 ** 2
DEFAULT_CACHE_SIZE = 10 * 1024 ** 3
DEFAULT_CACHE_MAX_AGE = 30 * 86400.0
#: the syntax of a duration in the configuration (:func:`parse_duration`)
DURATION_PATTERN = r"^\s*\d+(?:\.\d+)?\s*[smhd]?\s*$"

#: a site's keys; ``backend`` and the backends' settings sections come from the registry
#: (:func:`site_properties`)
_SITE_PROPERTIES: dict[str, Any] = {
    "host": {"type": "string", "minLength": 1},
    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
    "user": {"type": "string", "minLength": 1},
    "identity_file": {"type": "string", "minLength": 1},
    "known_hosts": {"type": "string", "minLength": 1},
    "root": {"type": "string", "minLength": 1},
    "entrypoint": {"type": "string", "minLength": 1},
    "templates": {"type": "array", "items": {"type": "string"}},
    "cleanup": {"enum": list(CLEANUP_POLICIES)},
    "transfer": {"enum": list(TRANSFER_METHODS)},
    "rsync_threshold": SIZE_SCHEMA,
    "cache": {"type": "boolean"},
    "cache_min_size": SIZE_SCHEMA,
    "cache_size": SIZE_SCHEMA,
    "cache_max_age": {"type": ["number", "string"], "minimum": 0,
                      "pattern": DURATION_PATTERN},
    "connect_timeout": {"type": "number", "exclusiveMinimum": 0},
    "retry_tries": {"type": "integer", "minimum": 0, "maximum": 1000},
    "retry_max_interval": {"type": "number", "exclusiveMinimum": 0},
    "stall_timeout": {"type": "number", "minimum": 1},
    "cancel_grace": {"type": "number", "minimum": 0},
    "description": {"type": "string"},
    "restricted": {"type": "boolean"},
    "agent_dir": {"type": "string", "minLength": 1},
    "never_return": {"type": "array", "items": {"type": "string", "minLength": 1}},
    "only_return": {"type": "array", "items": {"type": "string", "minLength": 1}},
    "resources": RESOURCES_SCHEMA,
}


def site_properties() -> dict[str, Any]:
    """A site's schema properties: the fixed keys, ``backend`` (a name the registry
    knows: checked by :func:`remote_exec.backends.for_site`, which also finds plugins)
    and each backend's settings section (e.g. ``fujitsu:``) with its schema."""
    return {
        **_SITE_PROPERTIES,
        "backend": {"type": "string", "minLength": 1},
        **{section: backends.resolve(target) for section, target in backends.sections().items()},
    }


def schema() -> dict[str, Any]:
    """The configuration file's JSON schema (built from the backend registry)."""
    properties = site_properties()
    site = {"type": "object", "additionalProperties": False, "properties": properties}
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "defaults": site,
            "sites": {"type": "object", "additionalProperties": site},
            "legacy": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "solver_log_base": {"type": "string", "minLength": 1},
                    "site": {"type": "string", "minLength": 1},
                },
            },
        },
    }


@dataclass(frozen=True)
class Site:
    """Everything needed to reach one remote site and run there.

    Immutable: a run's own settings (``--retry``, ``--transfer``, ...) make a copy with
    :func:`dataclasses.replace` (see :func:`remote_exec.request.build_request`)."""

    name: str
    host: str
    port: int | None = None
    user: str | None = None
    identity_file: str | None = None
    known_hosts: str | None = None
    root: str = DEFAULT_ROOT
    entrypoint: str = DEFAULT_ENTRYPOINT
    templates: list[str] = field(default_factory=list)
    cleanup: str = "on-success"
    transfer: str = "auto"
    rsync_threshold: int = 256 * 1024 * 1024
    cache: bool = True
    cache_min_size: int = DEFAULT_CACHE_MIN_SIZE
    cache_size: int = DEFAULT_CACHE_SIZE
    cache_max_age: float = DEFAULT_CACHE_MAX_AGE  # seconds
    connect_timeout: float = 30.0
    retry_tries: int = 5
    retry_max_interval: float = 60.0
    stall_timeout: float = 60.0
    cancel_grace: float = 10.0
    description: str = ""
    restricted: bool = False
    agent_dir: str = DEFAULT_AGENT_DIR
    never_return: list[str] = field(default_factory=list)
    only_return: list[str] = field(default_factory=list)
    backend: str = backends.DEFAULT
    resources: dict[str, Any] = field(default_factory=dict)
    #: the backends' settings sections the site has (``fujitsu:``, ``slurmrest:``), by name
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    defined_in: str | None = None  # the file that defined it, None for a bare host alias

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Site:
        """A site as :func:`dataclasses.asdict` wrote it (a journal record, the holder's
        wire); a record of an older version kept a backend's section as its own key."""
        values = dict(data)
        settings = dict(values.pop("settings", None) or {})
        for section in backends.sections():
            if section in values:
                settings[section] = values.pop(section) or {}
        return cls(settings=settings, **values)

    @property
    def display(self) -> str:
        """``user@host:port`` as far as known, for messages."""
        text = self.host
        if self.user:
            text = f"{self.user}@{text}"
        if self.port:
            text = f"{text}:{self.port}"
        return text


@dataclass
class Config:
    """A loaded configuration file (or none at all)."""

    path: Path | None
    sites: dict[str, dict[str, Any]]
    defaults: dict[str, Any]
    legacy: dict[str, Any]

    def site(self, name: str) -> Site:
        """The site ``name``; an undefined name is an SSH host alias with defaults."""
        if not name or name.startswith("-") or any(c.isspace() for c in name):
            raise ConfigError(f"invalid site or host name {name!r}")
        values: dict[str, Any] = dict(self.defaults)
        if name in self.sites:
            values.update(self.sites[name])
            values.setdefault("host", name)
            defined_in = str(self.path)
        else:
            values["host"] = name
            defined_in = None
        for key in ("identity_file", "known_hosts"):
            if values.get(key):
                values[key] = os.path.expanduser(values[key])
        for key in ("rsync_threshold", "cache_min_size", "cache_size"):
            if key in values:
                values[key] = parse_size(values[key], f"{self.path}: sites.{name}.{key}")
        if "cache_max_age" in values:
            values["cache_max_age"] = _duration_value(
                values["cache_max_age"], f"{self.path}: sites.{name}.cache_max_age")
        for key in ("never_return", "only_return"):
            for pattern in values.get(key) or []:
                check_return_pattern(pattern, f"{self.path}: sites.{name}.{key}")
        if values.get("resources"):
            from remote_exec.backends.scheduler import Resources

            Resources.parse(values["resources"], f"{self.path}: sites.{name}.resources")
        _check_sections(values, f"{self.path}: sites.{name}")
        settings = {section: values.pop(section) or {} for section in backends.sections()
                    if section in values}
        site = Site(name=name, defined_in=defined_in, settings=settings, **values)
        try:
            backends.for_site(site)  # e.g. a restricted site with a batch backend
        except ConfigError as err:
            hint = "remove `backend` or `restricted` from the site" if site.restricted \
                else err.hint
            raise ConfigError(f"{self.path}: sites.{name}: {err.message}", hint=hint) from None
        return site

    @property
    def solver_log_base(self) -> str:
        return str(self.legacy.get("solver_log_base", DEFAULT_SOLVER_LOG_BASE))


def _check_sections(values: dict[str, Any], where: str) -> None:
    """Each backend's own check of its settings section (the registry's
    ``section_check``), for a site that uses that backend or has the section."""
    backend = values.get("backend") or backends.DEFAULT
    for name in backends.names():
        entry = backends.get(name)
        if entry.section and entry.section_check and (
                backend == entry.name or values.get(entry.section)):
            backends.resolve(entry.section_check)(values.get(entry.section), where)


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``30d`` as seconds; a ConfigError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    if not match:
        raise ConfigError(f"invalid duration {text!r}",
                          hint="use a number with an optional unit s, m, h or d (e.g. 30d, 90s)")
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * scale

def _duration_value(value: Any, what: str) -> float:
    """A duration key's value in seconds (a bare number is seconds)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return parse_duration(str(value))
    except ConfigError as err:
        raise ConfigError(f"{what}: {err.message}", hint=err.hint) from None


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The configuration file to use, in the documented lookup order, or None."""
    named = (
        (explicit, "", "check the --config path"),
        (os.environ.get("REMOTE_EXEC_CONFIG"), " (from $REMOTE_EXEC_CONFIG)",
         "unset REMOTE_EXEC_CONFIG or point it at a file"),
    )
    for value, origin, hint in named:
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise ConfigError(f"configuration file {path}{origin} does not exist", hint=hint)
            return path
    for candidate in (Path("remote-exec.yaml"), user_config_file()):
        if candidate.is_file():
            return candidate
    return None


def load_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    """Find, parse and validate the configuration; errors name the file, line and key."""
    path = find_config_file(explicit)
    if path is None:
        return Config(path=None, sites={}, defaults={}, legacy={})
    return parse_config(path.read_text(encoding="utf-8"), path)


def parse_config(text: str, path: Path) -> Config:
    """Parse and validate configuration ``text`` read from ``path``.

    Every problem is reported at once, each as ``FILE:LINE: KEY: what is wrong``.
    """
    node, data, duplicates = _load_yaml(text, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the top level must be a mapping with a 'sites' key")
    problems = sorted(duplicates + _schema_problems(data, node), key=lambda p: p[0])
    if problems:
        raise ConfigError("\n".join(f"{path}:{line}: {text}" for line, text in problems))
    return Config(
        path=path,
        sites={k: dict(v or {}) for k, v in (data.get("sites") or {}).items()},
        defaults=dict(data.get("defaults") or {}),
        legacy=dict(data.get("legacy") or {}),
    )


#: a problem found in the file: (1-based line, "key: what is wrong")
Problem = tuple[int, str]


def _load_yaml(text: str, path: Path) -> tuple[Any, Any, list[Problem]]:
    """The YAML node tree, the data, and the keys given twice in one mapping."""
    import yaml

    loader = _unique_key_loader()(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    finally:
        loader.dispose()
    return node, data, loader.duplicates


_LOADER: Any = None


def _unique_key_loader() -> Any:
    """A SafeLoader that records every key given twice in one mapping.

    YAML requires keys to be unique; PyYAML would silently keep the last one, so a
    site's second ``port:`` would win without a word.
    """
    global _LOADER
    if _LOADER is not None:
        return _LOADER
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class UniqueKeyLoader(base):  # type: ignore[misc,valid-type]
        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self.duplicates: list[Problem] = []

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            first: dict[Any, int] = {}
            for key_node, _value in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults` may be overridden on purpose
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        self.duplicates.append((line, f"{key}: duplicate key {key!r} (first "
                                                f"on line {first[key]}); YAML keeps only "
                                                "the last one: remove one of them"))
                    else:
                        first[key] = line
                except TypeError:
                    continue  # an unhashable key: the constructor reports it
            return super().construct_mapping(node, deep=deep)

    _LOADER = UniqueKeyLoader
    return _LOADER


_VALIDATOR = None


def _validator() -> Any:
    global _VALIDATOR
    if _VALIDATOR is None:
        _VALIDATOR = _compiled_validator(schema())
    return _VALIDATOR


def _compiled_validator(spec: dict[str, Any]) -> Any:
    """fastjsonschema's validator of ``spec``. Generating and compiling it costs some
    80 ms, paid by every command, so its code object is kept in the state directory
    (``compiled/``, keyed by the schema and the versions of fastjsonschema and Python)
    and loaded in well under a millisecond; a missing, unreadable or unwritable copy
    only costs the compilation."""
    import contextlib
    import hashlib
    import json
    import marshal
    import sys
    import tempfile

    import fastjsonschema

    key = hashlib.sha256(json.dumps([spec, fastjsonschema.VERSION, sys.version],
                                    sort_keys=True).encode()).hexdigest()[:32]
    directory = state_dir() / "compiled"
    path = directory / f"config-schema-{key}.marshal"
    try:
        code = marshal.loads(path.read_bytes())  # noqa: S302 - our own file, 0700 dir
    except (OSError, EOFError, ValueError, TypeError):
        code = compile(fastjsonschema.compile_to_code(spec), "<config schema>", "exec")
        with contextlib.suppress(OSError):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            for old in directory.glob("config-schema-*"):  # (an earlier schema's)
                old.unlink()
            with tempfile.NamedTemporaryFile(dir=directory, delete=False) as tmp:
                tmp.write(marshal.dumps(code))
            os.replace(tmp.name, path)
    namespace: dict[str, Any] = {}
    exec(code, namespace)  # noqa: S102 - fastjsonschema's code for our own schema
    return namespace["validate"]


def _schema_problems(data: dict[str, Any], node: Any) -> list[Problem]:
    """Every place where ``data`` breaks :func:`schema`.

    fastjsonschema checks a sound file quickly (it runs on every command) but stops
    at the first error; only then is jsonschema imported to list them all.
    """
    import fastjsonschema

    try:
        _validator()(data)
        return []
    except fastjsonschema.JsonSchemaValueException:
        pass
    import jsonschema

    problems: list[Problem] = []
    for error in jsonschema.Draft7Validator(schema()).iter_errors(data):
        problems += _problems_of(error, node)
    return problems


def _problems_of(error: Any, node: Any) -> list[Problem]:
    """One jsonschema error as problems located in the file (one per unknown key)."""
    keys = [str(k) for k in error.absolute_path]
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        where = ".".join(keys) or "top level"
        return [(_locate(node, [*keys, str(key)])[0],
                 f"{key}: unknown key {str(key)!r} in {where}; "
                 f"allowed keys: {', '.join(allowed)}")
                for key in error.instance if key not in allowed]
    line, dotted = _locate(node, keys)
    if error.schema == SIZE_SCHEMA:
        return [(line, f"{dotted}: invalid size {error.instance!r}: {SIZE_HINT}")]
    return [(line, f"{dotted}: {error.message}")]


def _locate(node: Any, keys: list[str]) -> tuple[int, str]:
    """The 1-based line of the YAML node at ``keys`` and the dotted key for messages."""
    line = 1 if node is None else node.start_mark.line + 1
    current = node
    for key in keys:
        found = None
        if current is not None and hasattr(current, "value") and isinstance(current.value, list):
            for item in current.value:
                if isinstance(item, tuple) and str(item[0].value) == key:
                    found = item
                    break
            if found is None and key.isdigit():
                index = int(key)
                if index < len(current.value) and not isinstance(current.value[index], tuple):
                    current = current.value[index]
                    line = current.start_mark.line + 1
                    continue
        if found is None:
            break
        line = found[0].start_mark.line + 1
        current = found[1]
    return line, ".".join(keys) or "(top level)"
