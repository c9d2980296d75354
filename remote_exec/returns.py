"""Which files of a run directory come back: the return filter, on the local side.

Three lists of glob patterns decide (see :func:`remote_exec_agent.match_pattern`:
``*`` stays within one path segment, ``**`` spans any number of them, and a pattern
naming a directory covers everything under it):

  * the template's ``returns`` (default ``**``: everything, as the legacy flow did);
  * the site's ``only_return``: if given, nothing outside it comes back;
  * the site's ``never_return``: never comes back, whatever the others say.

On a restricted site the agent applies its own copy of the site's lists (the
allowlist file on the remote host is the authority) before a byte leaves the host;
the same functions run here for open sites, so both agree. They live in the
agent, a standard-library-only file, and are loaded from it.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from functools import lru_cache
from types import ModuleType

from remote_exec.paths import shipped_dir
from remote_exec.templates import RETURN_ALL

AGENT_FILE = "remote_exec_agent.py"


@lru_cache(maxsize=1)
def agent_module() -> ModuleType:
    """The remote-side agent, imported as a module (it has no import-time effects)."""
    path = shipped_dir("remote-side_scripts") / AGENT_FILE
    spec = importlib.util.spec_from_file_location("remote_exec_agent", path)
    if spec is None or spec.loader is None:  # pragma: no cover - a broken install
        raise ImportError(f"cannot load the remote-side agent from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("remote_exec_agent", module)
    spec.loader.exec_module(module)
    return module


def is_trivial(returns: Sequence[str], never: Sequence[str], only: Sequence[str]) -> bool:
    """Whether the filter lets everything through."""
    return list(returns) == RETURN_ALL and not never and not only


def predicate(returns: Sequence[str], never: Sequence[str],
              only: Sequence[str]) -> Callable[[str], bool]:
    """``keep(relpath)``: whether the file at ``relpath`` comes back."""
    agent = agent_module()
    returns, never, only = list(returns), list(never), list(only)

    def keep(relpath: str) -> bool:
        return bool(agent.is_returned(relpath, returns, never, only))

    return keep
