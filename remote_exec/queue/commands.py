"""``remote-exec queue ...``: the queue server of the pull method and its administration.

Attached to ``remote-exec`` through the registry's ``commands`` field (the ``pull``
backend's line). Imports only click at import time; aiohttp and the server are imported
when a command runs. The admin commands (token, runs, gc) work directly on the SQLite
database of the configuration's ``state_dir``, whether the server runs or not.
"""

from __future__ import annotations

import sys
import time
from typing import Any, NoReturn

import click

from remote_exec.errors import EXIT_USAGE, ConfigError, RemoteExecError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

_config_option = click.option(
    "--config", "config_file", metavar="FILE",
    help="The queue server's configuration (default: $REMOTE_EXEC_QUEUE_CONFIG, else "
    "./queue.yaml).")


def _fail(err: RemoteExecError) -> NoReturn:
    click.echo(f"remote-exec: error: {err}", err=True)
    sys.exit(EXIT_USAGE)


def _settings(config_file: str | None) -> Any:
    from remote_exec.queue.settings import config_path, load_settings

    return load_settings(config_path(config_file))


def _store(config_file: str | None) -> Any:
    from remote_exec.queue.store import Store

    settings = _settings(config_file)
    return Store(settings.state_dir, lease_ttl=settings.lease_ttl,
                 lost_after=settings.lost_after), settings


def _when(t: float | None) -> str:
    from remote_exec.queue.store import rfc3339

    return rfc3339(t) or "-"


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        click.echo("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())


@click.group("queue", context_settings=CONTEXT)
def group() -> None:
    """The queue server of the pull method (sites that accept no inbound SSH).

    \b
    Sites that accept no inbound SSH run a poller that takes their runs from this server
    over outbound HTTPS; runs with `backend: pull` put their jobs here. The protocol is
    docs/pull-protocol.md; the configuration (queue.yaml) is described in
    remote_exec/queue/settings.py.
    """


@group.command("serve", context_settings=CONTEXT)
@_config_option
def serve(config_file: str | None) -> None:
    """Run the queue server until SIGTERM or SIGINT.

    Prints one line `remote-exec queue: listening on https://HOST:PORT/PREFIX` once it
    accepts connections. On SIGTERM/SIGINT it stops accepting, ends the long-polls and
    exits 0. The state (SQLite + spool in `state_dir`) survives any stop, even SIGKILL.
    Exits 2 with what to fix if the configuration, the certificate or the port is wrong.
    """
    try:
        settings = _settings(config_file)
        from remote_exec.queue.server import serve as run_server

        run_server(settings)
    except ConfigError as err:
        _fail(err)


@group.group("token", context_settings=CONTEXT)
def token() -> None:
    """Add, list and revoke the bearer tokens of sites (pollers) and submitters."""


@token.command("add", context_settings=CONTEXT)
@click.option("--role", type=click.Choice(["site", "submit"]), required=True,
              help="site: a poller of one site; submit: MInt-side runs (backend: pull).")
@click.option("--site", "sites", multiple=True, metavar="SITE",
              help="For --role site exactly one; for --role submit the sites it may use "
              "(repeat; none: every site).")
@click.option("--expires", metavar="DURATION", default=None,
              help="Lifetime such as 180d, 12h, 90m (default: 180d for site tokens, none for "
              "submit tokens; `never` for none).")
@click.option("--note", metavar="TEXT", help="A note shown by `token list` (who holds it).")
@_config_option
def token_add(role: str, sites: tuple[str, ...], expires: str | None, note: str | None,
              config_file: str | None) -> None:
    """Create a token and print it, alone, on stdout: it is shown this once.

    The server keeps only its sha256. Give it to the poller in a file of mode 0600 (site
    tokens) or to the MInt side's `pull: token_file` (submit tokens).
    """
    from remote_exec.config import parse_duration

    try:
        if role == "site" and len(sites) != 1:
            raise ConfigError("a site token needs exactly one --site",
                              hint="e.g. remote-exec queue token add --role site --site corp-lab")
        if expires is None:
            expires = "180d" if role == "site" else "never"
        expires_at = None if expires == "never" else time.time() + parse_duration(expires)
        store, _ = _store(config_file)
        click.echo(store.add_token(role, list(sites), expires_at, note))
    except ConfigError as err:
        _fail(err)


@token.command("list", context_settings=CONTEXT)
@_config_option
def token_list(config_file: str | None) -> None:
    """The tokens (never the tokens themselves: their id is the first 12 hex of the hash)."""
    try:
        store, _ = _store(config_file)
    except ConfigError as err:
        _fail(err)
    now = time.time()
    rows = []
    for t in store.tokens():
        expired = t["expires_at"] is not None and t["expires_at"] <= now
        rows.append([t["hash"][:12], t["role"], ",".join(t["sites"]) or "*",
                     _when(t["created_at"]),
                     _when(t["expires_at"]) + (" (expired)" if expired else ""),
                     _when(t["revoked_at"]), _when(t["last_used_at"]), t["note"] or ""])
    _table(["ID", "ROLE", "SITES", "CREATED", "EXPIRES", "REVOKED", "LAST USED", "NOTE"], rows)


@token.command("revoke", context_settings=CONTEXT)
@click.argument("token_id", metavar="ID")
@_config_option
def token_revoke(token_id: str, config_file: str | None) -> None:
    """Revoke the token ID (from `token list`; a unique prefix is enough). Its next call
    gets 401 token_revoked."""
    try:
        store, _ = _store(config_file)
        matched = store.revoke_token(token_id)
        if not matched:
            raise ConfigError(f"no token has the id {token_id}", hint="see `queue token list`")
        if len(matched) > 1:
            raise ConfigError(f"{len(matched)} tokens start with {token_id}",
                              hint="give more of the id")
    except ConfigError as err:
        _fail(err)
    click.echo(f"revoked {matched[0][:12]}")


@group.command("runs", context_settings=CONTEXT)
@click.option("--site", metavar="SITE", help="Only the runs of this site.")
@click.option("--state", metavar="STATE",
              help="Only runs in this state (created, queued, claimed, ..., finished, expired,"
              " cancelled).")
@_config_option
def runs(site: str | None, state: str | None, config_file: str | None) -> None:
    """The runs the server holds, as a table."""
    try:
        store, _ = _store(config_file)
    except ConfigError as err:
        _fail(err)
    rows = []
    for run in store.list_runs(None, site, state):
        flags = ",".join(f for f in ("cancel_requested", "stalled") if run[f])
        poller = run["poller"]["host"] or run["poller"]["id"] if run["poller"] else "-"
        rows.append([run["id"], run["site"], run["entrypoint"], run["state"] + (
            f" ({run['outcome']})" if run["outcome"] else ""), str(run["attempt"]), poller,
            run["updated_at"], flags])
    _table(["RUN", "SITE", "ENTRYPOINT", "STATE", "ATTEMPT", "POLLER", "UPDATED", "FLAGS"],
           rows)


@group.command("gc", context_settings=CONTEXT)
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@_config_option
def gc(dry_run: bool, config_file: str | None) -> None:
    """Remove terminal runs older than `retention` (with their spool), spool directories
    of no run, temporary upload files older than an hour, and pollers not seen for
    `retention`. Safe while the server runs; run it daily (cron, systemd timer)."""
    try:
        store, settings = _store(config_file)
    except ConfigError as err:
        _fail(err)
    found = store.gc(settings.retention, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for run_id in found["runs"]:
        click.echo(f"{verb} run {run_id}")
    for name in found["orphans"]:
        click.echo(f"{verb} orphaned spool directory {name}")
    for name in found["temp_files"]:
        click.echo(f"{verb} temporary file {name}")
    for name in found["pollers"]:
        click.echo(f"{verb} poller {name} (not seen for `retention`)")
    click.echo(f"{verb} {len(found['runs'])} run(s), {len(found['orphans'])} orphaned "
               f"directory(ies), {len(found['temp_files'])} temporary file(s), "
               f"{len(found['pollers'])} poller(s)")
