"""A ``slurmrest`` site's ``slurmrest:`` section: which API, where, and how to authenticate.

::

    slurmrest:
      dialect: slurmrestd            # slurmrestd (Slurm's own daemon) | frce
      url: https://slurm.example:6820
      api_version: auto              # slurmrestd: auto (the highest both know) | v0.0.38 ...
      user: mint                     # X-SLURM-USER-NAME (default: the site's SSH user)
      token_file: ~/.config/remote-exec/slurm.jwt       # 0600; or
      token_command: [scontrol, token, lifespan=3600]   # run over the site's SSH
      ca_file: /etc/ssl/site-ca.pem
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remote_exec.errors import ConfigError
from remote_exec.paths import read_private

DIALECTS = ("slurmrestd", "frce")
#: each dialect's authentication schemes; the first is its default
AUTHS = {"slurmrestd": ("jwt", "none"), "frce": ("negotiate", "none")}
#: how a running FRCE job is cancelled: ``scancel`` over the site's SSH, or the run's
#: cancel mark, which the job script watches (a queued job then starts and exits at once)
FRCE_CANCEL = ("scancel", "mark")

SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["url"],
    "properties": {
        "dialect": {"enum": list(DIALECTS)},
        "url": {"type": "string", "pattern": "^https?://"},
        "api_version": {"type": "string", "pattern": "^(auto|v[0-9]+\\.[0-9]+\\.[0-9]+)$"},
        "auth": {"enum": sorted({a for names in AUTHS.values() for a in names})},
        "user": {"type": "string", "minLength": 1, "pattern": "^[A-Za-z0-9_.][A-Za-z0-9_.-]*$"},
        "token_file": {"type": "string", "minLength": 1},
        "token_command": {"type": "array", "minItems": 1,
                          "items": {"type": "string", "minLength": 1}},
        "ca_file": {"type": "string", "minLength": 1},
        "request_timeout": {"type": "number", "minimum": 1},
        "cancel": {"enum": list(FRCE_CANCEL)},
        "body_limit": {"type": "integer", "minimum": 256},
    },
}


@dataclass(frozen=True)
class SlurmRestSettings:
    url: str
    dialect: str = "slurmrestd"
    api_version: str = "auto"
    auth: str = ""
    user: str | None = None
    token_file: str | None = None
    token_command: list[str] = field(default_factory=list)
    ca_file: str | None = None
    request_timeout: float = 30.0
    cancel: str = "scancel"
    #: the FRCE API refuses a POST over 4 KB (``postdata_too_big``); requests are checked
    #: against this before they are sent
    body_limit: int = 4000

    @classmethod
    def from_site(cls, values: dict[str, Any] | None, where: str) -> SlurmRestSettings:
        if not values:
            raise ConfigError(f"{where}: a `slurmrest` site needs a `slurmrest:` section",
                              hint="at least `url` (and `dialect: frce` for an FRCE-style "
                              "API); see the README's Slurm REST section")
        data = dict(values)
        data["url"] = str(data["url"]).rstrip("/")
        dialect = data.get("dialect", "slurmrestd")
        auth = data.setdefault("auth", AUTHS[dialect][0])
        if auth not in AUTHS[dialect]:
            raise ConfigError(f"{where}: slurmrest.auth {auth!r} does not fit dialect "
                              f"{dialect!r}", hint="use one of " + ", ".join(AUTHS[dialect]))
        if dialect == "frce" and data.get("api_version", "auto") != "auto":
            raise ConfigError(f"{where}: slurmrest.api_version is for slurmrestd only")
        if data.get("token_file") and data.get("token_command"):
            raise ConfigError(f"{where}: give slurmrest.token_file or token_command, "
                              "not both")
        for key in ("token_file", "ca_file"):
            if data.get(key):
                data[key] = os.path.expanduser(data[key])
        return cls(**data)

    @property
    def tls(self) -> bool:
        return self.url.startswith("https://")


def check_section(values: dict[str, Any] | None, where: str) -> None:
    """The configuration's check of a site's ``slurmrest:`` section (the registry's
    ``section_check``)."""
    SlurmRestSettings.from_site(values, where)


def read_secret_file(path_text: str, what: str) -> str:
    """The first non-empty line of a file that only its owner may read (a token)."""
    for line in read_private(Path(path_text), what).splitlines():
        if line.strip():
            return line.strip()
    raise ConfigError(f"the {what} {path_text} is empty")
