"""``remote-exec site check SITE``: is this site ready, and if not, what to do.

One row per fact, in the order a run needs them; a failing row carries its fix.
Which facts matter is the backend's to say (:meth:`~remote_exec.backends.base.Backend.check`):
for a site reached by SSH, see :mod:`remote_exec.backends.site_check`.
"""

from __future__ import annotations

from remote_exec import backends
from remote_exec.config import Site
from remote_exec.errors import RemoteExecError
from remote_exec.site.rows import FAIL, OK, SKIP, WARN, Row, as_dicts, failed


async def check(site: Site) -> list[Row]:
    try:
        backend = backends.make_backend(backends.for_site(site), site, "site-check")
    except RemoteExecError as err:
        return [Row("configuration", FAIL, err.message, err.hint or "")]
    return await backend.check()


__all__ = ["FAIL", "OK", "SKIP", "WARN", "Row", "as_dicts", "check", "failed"]
