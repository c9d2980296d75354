"""A ``pull`` site's ``pull:`` section: which queue server, and the submit token.

::

    pull:
      server: https://mint-queue.example:8443/re-pull/v1
      token_file: ~/.config/remote-exec/pull-submit.token   # mode 0600
      ca_file: /etc/remote-exec/queue-ca.pem                 # default: the system's CAs
      queue_timeout: 30m      # no poller of the site claimed the run by then: exit 69
      poll_wait: 25           # seconds one long-poll lasts
      request_timeout: 60     # seconds one request (other than a long-poll) may take
      legacy_commands:        # `remote-exec legacy-pull` (MInt's mi-system-wf.py arguments):
        ~/misrc_remote_workflow/scripts/execute_remote-side_program_api.sh: site
        abaqus.sh: {entrypoint: abaqus, params: [input=job.inp]}

The site's `retry_tries` and `retry_max_interval` say how long a server that does not
answer (or answers 5xx, 429, 503) is retried before the run is interrupted (exit 75,
``resume``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remote_exec.errors import ConfigError
from remote_exec.paths import read_private

#: the section of a pull site (``pull:``)
SECTION = "pull"
#: how long a queued run waits for a poller of its site, by default (MInt's own rule
#: dropped unclaimed jobs after 30 minutes, silently)
DEFAULT_QUEUE_TIMEOUT = 1800.0
#: the server holds a long-poll at most this long (protocol: ``claim_wait_max``)
MAX_POLL_WAIT = 55.0

SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["server", "token_file"],
    "properties": {
        "server": {"type": "string", "pattern": "^https?://"},
        "token_file": {"type": "string", "minLength": 1},
        "ca_file": {"type": "string", "minLength": 1},
        "queue_timeout": {"type": ["string", "number"]},
        "poll_wait": {"type": "number", "minimum": 0, "maximum": MAX_POLL_WAIT},
        "request_timeout": {"type": "number", "minimum": 1},
        # MInt's WebAPI argument form (`remote-exec legacy-pull`): COMMAND -> entrypoint
        "legacy_commands": {"type": "object", "additionalProperties": {"oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "object", "additionalProperties": False, "required": ["entrypoint"],
             "properties": {"entrypoint": {"type": "string", "minLength": 1},
                            "params": {"type": "array", "items": {"type": "string"}}}},
        ]}},
    },
}


@dataclass(frozen=True)
class PullSettings:
    server: str
    token_file: str
    ca_file: str | None = None
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT
    poll_wait: float = 25.0
    request_timeout: float = 60.0
    legacy_commands: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_site(cls, values: dict[str, Any] | None, where: str) -> PullSettings:
        check_section(values, where)
        assert values is not None
        from remote_exec.config import parse_duration

        data = dict(values)
        data["server"] = str(data["server"]).rstrip("/")
        data["token_file"] = os.path.expanduser(str(data["token_file"]))
        if data.get("ca_file"):
            data["ca_file"] = os.path.expanduser(str(data["ca_file"]))
        timeout = data.get("queue_timeout", DEFAULT_QUEUE_TIMEOUT)
        try:
            data["queue_timeout"] = float(timeout) if isinstance(timeout, (int, float)) \
                else parse_duration(str(timeout))
        except (ConfigError, ValueError):
            raise ConfigError(f"{where}: invalid pull.queue_timeout {timeout!r}",
                              hint="a duration such as 30m or 2h") from None
        return cls(**data)

    def token(self) -> str:
        """The submit token (from a file only its owner may read)."""
        text = read_private(Path(self.token_file), "pull token file").strip()
        if not text:
            raise ConfigError(f"the pull token file {self.token_file} is empty",
                              hint="put the token `remote-exec queue token add --role submit` "
                              "printed in it")
        return text


def check_section(values: dict[str, Any] | None, where: str) -> None:
    if not values:
        raise ConfigError(f"{where}: a `pull` site needs a `pull:` section",
                          hint="at least `server` and `token_file`; see the README's pull "
                          "method section")
    if str(values.get("server", "")).startswith("http://"):
        raise ConfigError(f"{where}: pull.server must be an https:// URL",
                          hint="the queue server carries the site's inputs and results: "
                          "serve it over TLS (`tls:` in its queue.yaml)")
