"""A ``pull`` site's ``pull:`` section: which queue server, and the submit token.

::

    pull:
      server: https://mint-queue.example:8443/re-pull/v1
      token_file: ~/.config/remote-exec/pull-submit.token   # mode 0600
      ca_file: /etc/remote-exec/queue-ca.pem                 # default: the system's CAs
      queue_timeout: 30m      # no poller of the site claimed the run: exit 69
      poll_wait: 25           # seconds one long-poll lasts
"""

from __future__ import annotations

from typing import Any

from remote_exec.errors import ConfigError

SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["server", "token_file"],
    "properties": {
        "server": {"type": "string", "pattern": "^https?://"},
        "token_file": {"type": "string", "minLength": 1},
        "ca_file": {"type": "string", "minLength": 1},
        "queue_timeout": {"type": ["string", "number"]},
        "poll_wait": {"type": "number", "minimum": 0, "maximum": 55},
    },
}


def check_section(values: dict[str, Any] | None, where: str) -> None:
    if not values:
        raise ConfigError(f"{where}: a `pull` site needs a `pull:` section",
                          hint="at least `server` and `token_file`; see the README's pull "
                          "method section")
