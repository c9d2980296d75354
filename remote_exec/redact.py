"""Secrets never leave in text: a registry of secret values and a logging filter.

Code that loads a credential calls :func:`register` with it; :func:`redact` replaces
every registered value in a text, and :func:`setup_debug_logging` (``REMOTE_EXEC_DEBUG=1``)
installs a handler whose filter redacts every record, third-party libraries' included.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

_SECRETS: set[str] = set()
_LOCK = threading.Lock()
MASK = "***"


def register(*values: str | None) -> None:
    """Treat each non-trivial value as a secret from now on."""
    with _LOCK:
        _SECRETS.update(v for v in values if v and len(v) >= 4)


def redact(text: str) -> str:
    """``text`` with every registered secret masked (longest first)."""
    with _LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Formats each record's message once, masked, so no handler sees a secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record still must not leak
            message = str(record.msg)
        record.msg, record.args = redact(message), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def setup_debug_logging() -> None:
    """With ``REMOTE_EXEC_DEBUG=1``: every logger at DEBUG to stderr, redacted."""
    if os.environ.get("REMOTE_EXEC_DEBUG", "") in ("", "0"):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("remote-exec debug: %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
