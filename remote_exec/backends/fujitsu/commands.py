"""``remote-exec fujitsu ...``: a ``fujitsu`` site's HPC WebAPI by hand (for debugging).

Attached to ``remote-exec`` through the registry's ``commands`` field. Imports only
click at import time (``remote-exec --help`` stays fast); the WebAPI client, and what
it needs, is imported when a command runs.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from remote_exec.errors import ConfigError, RemoteExecError

#: the backend these commands belong to (its registry name)
BACKEND = "fujitsu"

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(err: RemoteExecError) -> NoReturn:
    click.echo(f"remote-exec: error: {err}", err=True)
    sys.exit(err.exit_code)


@click.group(BACKEND, context_settings=CONTEXT)
def group() -> None:
    """Talk to a `fujitsu` site's HPC WebAPI by hand (for debugging).

    \b
    Credentials: REMOTE_EXEC_FUJITSU_TOKEN (auth: bearer), or
    REMOTE_EXEC_FUJITSU_ACCESS_KEY and REMOTE_EXEC_FUJITSU_SECRET_KEY (auth: hmac),
    or the site's credentials_file (mode 0600). --site may be left out when the
    configuration has exactly one fujitsu site.
    """


_site_option = click.option("--site", "-s", "site_name", metavar="SITE",
                            help="The fujitsu site (default: the only one configured).")
_config_option = click.option("--config", "config_path", metavar="FILE",
                              help="Configuration file.")


def sites_of_this_backend(config: Any) -> list[str]:
    """The configured sites whose backend (their own, or the defaults') is this one."""
    return [name for name, values in config.sites.items()
            if {**config.defaults, **values}.get("backend") == BACKEND]


def _api(site_name: str | None, config_path: str | None) -> Any:
    from remote_exec.backends.fujitsu.client import FujitsuService
    from remote_exec.config import load_config

    config = load_config(config_path)
    if site_name is None:
        names = sites_of_this_backend(config)
        if len(names) != 1:
            raise ConfigError(f"give --site: the configuration has {len(names) or 'no'} "
                              f"{BACKEND} sites" + (f" ({', '.join(names)})" if names else ""),
                              hint=f"sites with `backend: {BACKEND}`")
        site_name = names[0]
    return FujitsuService(config.site(site_name)).api


def _call(fn: Any) -> None:
    import json

    try:
        click.echo(json.dumps(fn(), indent=2, ensure_ascii=False))
    except RemoteExecError as err:
        _fail(err)


@group.command("jobs", context_settings=CONTEXT)
@_site_option
@_config_option
def jobs(site_name: str | None, config_path: str | None) -> None:
    """Get Job List: the queued and running jobs."""
    _call(lambda: _api(site_name, config_path).jobs())


@group.command("job", context_settings=CONTEXT)
@click.argument("job_id")
@_site_option
@_config_option
def job(job_id: str, site_name: str | None, config_path: str | None) -> None:
    """Get Job Detail of JOB_ID (exit 1 once it is no longer queued or running)."""
    detail = None

    def get() -> Any:
        nonlocal detail
        detail = _api(site_name, config_path).job(job_id)
        return detail if detail is not None else {"job_id": job_id,
                                                   "status": "not queued or running (404)"}
    _call(get)
    if detail is None:
        sys.exit(1)


@group.command("cancel", context_settings=CONTEXT)
@click.argument("job_id")
@_site_option
@_config_option
def cancel(job_id: str, site_name: str | None, config_path: str | None) -> None:
    """Cancel a Job: JOB_ID (exit 1 if it had already ended: 404)."""
    try:
        done = _api(site_name, config_path).cancel(job_id)
    except RemoteExecError as err:
        _fail(err)
    click.echo(f"job {job_id} cancelled" if done else f"job {job_id} had already ended")
    sys.exit(0 if done else 1)


@group.command("sync-status", context_settings=CONTEXT)
@click.argument("requestid")
@_site_option
@_config_option
def sync_status(requestid: str, site_name: str | None, config_path: str | None) -> None:
    """Get Synchronization Status of REQUESTID."""
    _call(lambda: _api(site_name, config_path).sync_status(requestid))
