"""One ``rescale`` site: its settings, its API key and client, and what Rescale's status
names mean (as data).

The key comes from ``REMOTE_EXEC_RESCALE_TOKEN`` (or seed 004's ``RESCALE_API_TOKEN``)
or from the site's ``token_file`` (the key alone, mode 0600). It is registered with
:mod:`remote_exec.redact` as soon as it is read, so the debug log masks it.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

from remote_exec import redact
from remote_exec.backends.rescale.api import RescaleApi
from remote_exec.backends.rescale.settings import SECTION, RescaleSettings
from remote_exec.backends.scheduler import (
    CANCELLED,
    COMPLETED,
    FAILED,
    QUEUED,
    RUNNING,
    JobInfo,
)
from remote_exec.config import Site
from remote_exec.errors import AuthError
from remote_exec.paths import read_private

TITLE = "Rescale"
#: where the key is looked for, in order, before the site's token_file
ENV_TOKENS = ("REMOTE_EXEC_RESCALE_TOKEN", "RESCALE_API_TOKEN")

#: a job's status (the reference's order: Pending → Queued → Started → Validated →
#: Executing → Completed; "Waiting for Queue" and "Stopping" from Rescale's own Nextflow
#: executor) → the common state. "Stopping" is not final: "Stopped" or "Completed" follows.
#: A name not here keeps the run waiting (it is shown as is).
JOB_STATES = {
    "Not Started": QUEUED,
    "Pending": QUEUED,
    "Waiting for Queue": QUEUED,
    "Queued": QUEUED,
    "Started": RUNNING,
    "Validated": RUNNING,
    "Executing": RUNNING,
    "Stopping": RUNNING,
    "Completed": COMPLETED,
    "Stopped": CANCELLED,
    "Failed": FAILED,
    "Force Stopped": CANCELLED,
}
#: the statuses after which the job no longer runs
JOB_ENDED = ("Completed", "Stopped", "Failed", "Force Stopped")
#: a persistent cluster's statuses (seed 004 and the reference): ready, on its way, down
CLUSTER_READY = ("Started",)
CLUSTER_COMING = ("Pending", "Queued", "Starting")
CLUSTER_DOWN = ("Not Started", "Stop Requested", "Stopping", "Stopped")


def load_token(settings: RescaleSettings, site: str) -> str:
    """The site's API key: the environment first, then its token_file."""
    token = next((os.environ[n].strip() for n in ENV_TOKENS if os.environ.get(n, "").strip()),
                 "")
    if not token and settings.token_file:
        path = Path(settings.token_file).expanduser()
        token = read_private(path, f"Rescale API key file of site {site!r}").strip()
    if not token:
        raise AuthError(f"no Rescale API key for site {site!r}",
                        hint=f"set {ENV_TOKENS[0]} or put the key alone in the site's "
                        "token_file (mode 0600)")
    redact.register(token)
    return token


class RescaleService:
    """The site's settings and its API client (the key loaded once)."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.settings = RescaleSettings.from_site(site.settings.get(SECTION),
                                                  f"site {site.name!r}")
        self.api = RescaleApi(self.settings, load_token(self.settings, site.name),
                              tries=site.retry_tries, max_interval=site.retry_max_interval)


def job_info(job_id: str, statuses: list[dict[str, Any]]) -> JobInfo:
    """A job's status history (newest first, as the API gives it) as a :class:`JobInfo`;
    the history, oldest first, goes to ``extra`` for ``status``."""
    current = statuses[0] if statuses else {}
    native = str(current.get("status") or "Not Submitted")
    by_name: dict[str, datetime | None] = {}
    for item in reversed(statuses):
        by_name.setdefault(str(item.get("status")), _time(item.get("statusDate")))
    history = " → ".join(str(s.get("status")) for s in reversed(statuses))
    ended = native in JOB_ENDED
    return JobInfo(job_id=job_id, native=native, state=JOB_STATES.get(native, QUEUED),
                   reason=str(current.get("statusReason") or ""),
                   submitted=by_name.get("Pending") or by_name.get("Queued"),
                   started=by_name.get("Executing") or by_name.get("Started"),
                   ended=_time(current.get("statusDate")) if ended else None,
                   extra={"history": history} if history else {})


def _time(value: Any) -> datetime | None:
    """An ISO time of the API (``2017-02-26T15:48:08.253000Z``), naive UTC."""
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).replace(tzinfo=None) \
            if value else None
    except ValueError:
        return None
