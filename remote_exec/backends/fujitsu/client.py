"""One ``fujitsu`` site's WebAPI and bucket, and what its job detail says."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from remote_exec.backends.fujitsu.api import WebApi
from remote_exec.backends.fujitsu.auth import load_auth
from remote_exec.backends.fujitsu.settings import FujitsuSettings
from remote_exec.backends.scheduler import JobInfo, parse_elapsed
from remote_exec.config import Site

TITLE = "Fujitsu HPC"


class FujitsuService:
    """The site's settings, its WebAPI client and (per run) its bucket prefix."""

    def __init__(self, site: Site, run_id: str = "") -> None:
        self.site = site
        self.run_id = run_id
        self.settings = FujitsuSettings.from_site(site.settings.get("fujitsu"),
                                                  f"site {site.name!r}")
        self.api = WebApi(self.settings, load_auth(self.settings, site.name),
                          tries=site.retry_tries, max_interval=site.retry_max_interval)
        self._bucket: Any = None

    @property
    def bucket(self) -> Any:
        if self._bucket is None:
            from remote_exec.backends.fujitsu.storage import Bucket

            self._bucket = Bucket(self.settings, self.run_id)
        return self._bucket

    @property
    def rundir(self) -> str:
        """The run directory on the HPC side, relative to where the API syncs."""
        return f"{self.settings.hpc_dir}/{self.run_id}"


def job_info(detail: dict[str, Any]) -> JobInfo:
    """A Get Job Detail object (§6.4.2, fugaku-api fields) as a :class:`JobInfo`."""
    from remote_exec.backends.pjm import PjmScheduler

    native = str(detail.get("status", "")).strip() or "?"
    reason = str(detail.get("Fugaku:reason", "")).strip()
    extra = {k: str(v) for k, v in detail.items()
             if k.startswith("Fugaku:") or k in ("elapse_time", "queue", "node_require",
                                                 "priority", "job_name")}
    return JobInfo(job_id=str(detail.get("job_id", "")), native=native,
                   state=PjmScheduler().map_state(native),
                   reason="" if reason in ("", "-") else reason,
                   submitted=_time(detail.get("accept")),
                   started=_time(detail.get("start_date")),
                   time_limit=str(detail.get("Fugaku:elapse_limit", "")).strip(),
                   used=parse_elapsed(str(detail.get("elapse_time", ""))),
                   extra=extra)


def _time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value)) if value and value != "-" else None
    except ValueError:
        return None
