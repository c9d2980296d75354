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
agent, a standard-library-only file, and are loaded from it
(:mod:`remote_exec.agent_file`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from remote_exec.agent_file import agent_module
from remote_exec.templates import return_all


def is_trivial(returns: Sequence[str], never: Sequence[str], only: Sequence[str]) -> bool:
    """Whether the filter lets everything through."""
    return list(returns) == return_all() and not never and not only


def predicate(returns: Sequence[str], never: Sequence[str],
              only: Sequence[str]) -> Callable[[str], bool]:
    """``keep(relpath)``: whether the file at ``relpath`` comes back."""
    agent = agent_module()
    returns, never, only = list(returns), list(never), list(only)

    def keep(relpath: str) -> bool:
        return bool(agent.is_returned(relpath, returns, never, only))

    return keep
