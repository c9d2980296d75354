"""``queue.yaml``: the queue server's configuration, its schema and its loading.

::

    listen: 127.0.0.1:8443      # host:port; port 0 picks a free one
    tls: {cert: server.pem, key: server.key, client_ca: null}
    plain_http: false           # true only behind a TLS-terminating gateway
    prefix: /re-pull/v1
    state_dir: ./queue-state    # queue.sqlite (WAL), spool/, tmp/, queue.log
    max_file_size: 8GiB
    max_run_bytes: 32GiB
    min_free_space: 1GiB        # 507 no_space if an upload would leave less
    lease_ttl: 90               # seconds
    claim_wait_max: 55
    lost_after: 10m
    retention: 7d               # `queue gc` purges terminal runs older than this
    sweep_interval: 1           # seconds (advanced)
    sites: {corp-lab: {entrypoints: [abaqus]}}   # optional early refusal per site
    compat_v0:                  # sites still running MInt's original poller (opt-in)
      enabled: false
      prefix: /mi-distcomp-api
      max_job_bytes: 256MiB     # a run's inputs travel as one base64 JSON document
      lease_ttl: 600            # seconds; renewed by every call of the original poller
      reoffer_after: 60         # a run handed out but never asked for is offered again
      sites: {rme-u-tokyo: {command: "~/scripts/execute_remote-side_program_api.sh",
                            entrypoint: site}}

Relative paths are relative to the configuration file. With ``tls.client_ca`` set, every
client must present a certificate of that CA, and a site token's site must be the
certificate's CN or one of its SANs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastjsonschema
import yaml

from remote_exec.config import parse_duration
from remote_exec.errors import ConfigError
from remote_exec.sizes import SIZE_HINT, SIZE_SCHEMA, parse_size

ENV_CONFIG = "REMOTE_EXEC_QUEUE_CONFIG"
DEFAULT_CONFIG = "queue.yaml"

_DURATION = {"type": ["number", "string"]}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "listen": {"type": "string", "pattern": r"^\[?[^\s\]]*\]?:[0-9]{1,5}$"},
        "tls": {
            "type": ["object", "null"],
            "additionalProperties": False,
            "required": ["cert", "key"],
            "properties": {
                "cert": {"type": "string", "minLength": 1},
                "key": {"type": "string", "minLength": 1},
                "client_ca": {"type": ["string", "null"]},
            },
        },
        "plain_http": {"type": "boolean"},
        "prefix": {"type": "string", "pattern": "^(/[A-Za-z0-9._~-]+)*$"},
        "state_dir": {"type": "string", "minLength": 1},
        "max_file_size": SIZE_SCHEMA,
        "max_run_bytes": SIZE_SCHEMA,
        "min_free_space": SIZE_SCHEMA,
        "lease_ttl": _DURATION,
        "claim_wait_max": _DURATION,
        "lost_after": _DURATION,
        "retention": _DURATION,
        "sweep_interval": _DURATION,
        "sites": {
            "type": ["object", "null"],
            "additionalProperties": {
                "type": ["object", "null"],
                "additionalProperties": False,
                "properties": {"entrypoints": {"type": "array", "items": {"type": "string"}}},
            },
        },
        "compat_v0": {
            "type": ["object", "null"],
            "additionalProperties": False,
            "properties": {
                "enabled": {"type": "boolean"},
                "prefix": {"type": "string", "pattern": "^(/[A-Za-z0-9._~-]+)+$"},
                "max_job_bytes": SIZE_SCHEMA,
                "lease_ttl": _DURATION,
                "reoffer_after": _DURATION,
                "sites": {
                    "type": ["object", "null"],
                    "additionalProperties": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["command"],
                        "properties": {
                            "command": {"type": "string", "minLength": 1},
                            "entrypoint": {"type": "string", "minLength": 1},
                        },
                    },
                },
            },
        },
    },
}
_validate = fastjsonschema.compile(SCHEMA)


@dataclass
class CompatSite:
    """A site served to MInt's original poller: the command string its ``calc-params``
    answers, and the entrypoint name of the runs handed out to it."""

    command: str
    entrypoint: str = "site"


@dataclass
class CompatSettings:
    """``compat_v0``: MInt's original site protocol (see remote_exec/queue/compat.py)."""

    enabled: bool = False
    prefix: str = "/mi-distcomp-api"
    max_job_bytes: int = 256 * 1024 ** 2
    lease_ttl: float = 600.0
    reoffer_after: float = 60.0
    sites: dict[str, CompatSite] = field(default_factory=dict)


@dataclass
class Settings:
    """The loaded configuration, paths resolved, sizes in bytes, durations in seconds."""

    config_path: Path
    host: str = "127.0.0.1"
    port: int = 8443
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    plain_http: bool = False
    prefix: str = "/re-pull/v1"
    state_dir: Path = Path("queue-state")
    max_file_size: int = 8 * 1024 ** 3
    max_run_bytes: int = 32 * 1024 ** 3
    min_free_space: int = 1024 ** 3
    lease_ttl: float = 90.0
    claim_wait_max: float = 55.0
    lost_after: float = 600.0
    retention: float = 7 * 86400.0
    sweep_interval: float = 1.0
    site_entrypoints: dict[str, list[str]] = field(default_factory=dict)
    compat: CompatSettings = field(default_factory=CompatSettings)

    @property
    def scheme(self) -> str:
        return "http" if self.plain_http else "https"


def config_path(explicit: str | None) -> Path:
    """The configuration file: --config, else $REMOTE_EXEC_QUEUE_CONFIG, else ./queue.yaml."""
    return Path(explicit or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG).expanduser()


def _duration(values: dict[str, Any], key: str, default: float) -> float:
    value = values.get(key, default)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        try:
            seconds = parse_duration(str(value))
        except ConfigError as err:
            raise ConfigError(f"{key}: {err.message}", hint=err.hint) from None
    if seconds <= 0:
        raise ConfigError(f"{key}: must be more than 0 (it is {value!r})")
    return seconds


_HINTS = {"listen": "HOST:PORT, e.g. 127.0.0.1:8443 or [::1]:8443 (port 0: any free port)",
          "max_file_size": SIZE_HINT, "max_run_bytes": SIZE_HINT, "min_free_space": SIZE_HINT,
          "prefix": "a URL path such as /re-pull/v1",
          "compat_v0": "compat_v0: {enabled, prefix, max_job_bytes, lease_ttl, reoffer_after, "
          "sites: {SITE: {command: STRING, entrypoint: NAME}}} (remote_exec/queue/settings.py)"}
KEYS_HINT = "the keys are described in remote_exec/queue/settings.py"


def _schema_error(path: Path, err: fastjsonschema.JsonSchemaException) -> ConfigError:
    """The schema's complaint in the configuration's own words."""
    name = err.name or "data"
    where = name[5:] if name.startswith("data.") else ""
    message = err.message[len(name):].strip() if err.message.startswith(name) else err.message
    if message.startswith("must match pattern"):
        message = "is not valid"
    if "must not contain" in message:
        extra = message.split("{", 1)[-1].split("}", 1)[0]
        message = f"unknown key(s) {extra}"
    key = where.split(".", 1)[0].split("[", 1)[0]
    return ConfigError(f"{path}: {where + ': ' if where else ''}{message}",
                       hint=_HINTS.get(key, KEYS_HINT))


def load_settings(path: Path) -> Settings:
    """Read and check ``path``; a ConfigError saying what to fix otherwise."""
    try:
        return _load(path)
    except ConfigError as err:
        if err.message.startswith(str(path)):
            raise
        raise ConfigError(f"{path}: {err.message}", hint=err.hint) from None


def _load(path: Path) -> Settings:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"queue configuration {path} does not exist",
                          hint=f"give --config FILE or set ${ENV_CONFIG}") from None
    except OSError as err:
        raise ConfigError(f"cannot read queue configuration {path}: {err.strerror}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping of keys")
    try:
        _validate(values)
    except fastjsonschema.JsonSchemaException as err:
        raise _schema_error(path, err) from None
    base = path.resolve().parent

    def resolve(value: str) -> Path:
        return (base / Path(value).expanduser()).resolve()

    s = Settings(config_path=path.resolve())
    host, _, port = values.get("listen", "127.0.0.1:8443").rpartition(":")
    s.host, s.port = host.strip("[]"), int(port)
    if s.port > 65535:
        raise ConfigError(f"{path}: listen: {s.port} is not a port (0..65535)")
    s.lease_ttl = _duration(values, "lease_ttl", s.lease_ttl)
    s.claim_wait_max = _duration(values, "claim_wait_max", s.claim_wait_max)
    s.lost_after = _duration(values, "lost_after", s.lost_after)
    s.retention = _duration(values, "retention", s.retention)
    s.sweep_interval = _duration(values, "sweep_interval", s.sweep_interval)
    tls = values.get("tls")
    s.plain_http = bool(values.get("plain_http", False))
    if tls and s.plain_http:
        raise ConfigError(f"{path}: both `tls` and `plain_http: true`",
                          hint="keep `tls` (the server speaks HTTPS) or, behind a "
                          "TLS-terminating gateway only, remove `tls`")
    if not tls and not s.plain_http:
        raise ConfigError(f"{path}: no `tls` section",
                          hint="give `tls: {cert: FILE, key: FILE}`; `plain_http: true` is "
                          "only for a server behind a TLS-terminating gateway")
    if tls:
        s.cert, s.key = resolve(tls["cert"]), resolve(tls["key"])
        if tls.get("client_ca"):
            s.client_ca = resolve(tls["client_ca"])
    s.prefix = values.get("prefix", s.prefix)
    s.state_dir = resolve(values.get("state_dir", "queue-state"))
    for key in ("max_file_size", "max_run_bytes", "min_free_space"):
        if key in values:
            setattr(s, key, parse_size(values[key], key))
    for site, entry in (values.get("sites") or {}).items():
        if entry and entry.get("entrypoints") is not None:
            s.site_entrypoints[site] = list(entry["entrypoints"])
    s.compat = _compat(values.get("compat_v0") or {}, s.prefix)
    return s


def _compat(values: dict[str, Any], prefix: str) -> CompatSettings:
    c = CompatSettings(enabled=bool(values.get("enabled", False)))
    c.prefix = values.get("prefix", c.prefix)
    if c.prefix == prefix or c.prefix.startswith(prefix + "/") \
            or prefix.startswith(c.prefix + "/"):
        raise ConfigError(f"compat_v0.prefix {c.prefix} overlaps the protocol's prefix "
                          f"{prefix}", hint="MInt's original poller calls /mi-distcomp-api")
    if "max_job_bytes" in values:
        c.max_job_bytes = parse_size(values["max_job_bytes"], "compat_v0.max_job_bytes")
    try:
        c.lease_ttl = _duration(values, "lease_ttl", c.lease_ttl)
        c.reoffer_after = _duration(values, "reoffer_after", c.reoffer_after)
    except ConfigError as err:
        raise ConfigError(f"compat_v0.{err.message}", hint=err.hint) from None
    for site, entry in (values.get("sites") or {}).items():
        c.sites[site] = CompatSite(entry["command"], entry.get("entrypoint", "site"))
    if c.enabled and not c.sites:
        raise ConfigError("compat_v0 is enabled but lists no site",
                          hint="compat_v0.sites: {SITE: {command: STRING, entrypoint: NAME}}")
    return c
