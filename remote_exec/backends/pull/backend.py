"""The ``pull`` backend (work in progress)."""

from __future__ import annotations

from typing import Any

from remote_exec.backends.base import Backend
from remote_exec.errors import ConfigError


def _todo(*args: Any, **kwargs: Any) -> Any:
    raise ConfigError("the pull backend is not finished yet")


class PullBackend(Backend):
    place_noun = "queued job"

    open = create = stage = launch = wait = fetch = remove = stop = _todo  # type: ignore
    probe = read_log = cancel_recorded = cleanup_runs = check = _todo  # type: ignore
