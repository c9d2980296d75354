"""The ``remote-exec`` command line: parse, call the library, print. Nothing else lives here.

Heavy imports (asyncssh, rich) happen inside the commands that need them, so
``remote-exec --help`` and argument errors stay fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from remote_exec import __version__, backends
from remote_exec.errors import ConfigError, RemoteExecError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(err: RemoteExecError, as_json: bool = False) -> NoReturn:
    if as_json:
        import json

        sys.stderr.write(json.dumps({"event": "error", "message": err.message, "hint": err.hint,
                                     "exit_code": err.exit_code}) + "\n")
    else:
        click.echo(f"remote-exec: error: {err}", err=True)
    sys.exit(err.exit_code)


def _resolve_site(config_path: str | None, name: str) -> Any:
    """The site ``name`` as configured (the sandbox's when it is not in the file), and
    the configuration."""
    from remote_exec.config import load_config

    config = load_config(config_path)
    if name in config.sites:  # (the sandbox's module is imported only when it is meant)
        return config.site(name), config
    from remote_exec.sandbox import SITE_NAME, Sandbox

    if name == SITE_NAME:
        sandbox = Sandbox()
        if sandbox.port is None:
            raise ConfigError(
                "the sandbox site is not set up", hint="start it with `remote-exec sandbox up`"
            )
        config.sites[SITE_NAME] = sandbox.site_definition()
    return config.site(name), config



class _BackendName(click.ParamType):
    """A backend the registry knows (built in, or an installed plugin's, looked up only
    when named: listing plugins up front would cost every start-up)."""

    name = "backend"

    def get_metavar(self, param: click.Parameter, *args: Any, **kwargs: Any) -> str:
        return "[" + "|".join(backends.choosable()) + "|PLUGIN]"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        try:
            entry = backends.get(str(value))
        except ConfigError as err:
            self.fail(f"{err.message} ({err.hint})", param, ctx)
        if not entry.choosable:
            self.fail(f"{entry.name!r} cannot be chosen: {entry.summary}", param, ctx)
        return entry.name

@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="remote-exec")
def main() -> None:
    """Run a MInt module's remote step over one SSH connection.

    Stage the declared inputs into a fresh <root>/<uuid> directory on the remote
    host, run the site's entrypoint (or an allowlisted template) there, bring the
    whole directory back, and clean up. Start with `remote-exec demo`.

    REMOTE_EXEC_DEBUG=1 prints debug logs on stderr (secrets are masked).
    """
    from remote_exec.redact import setup_debug_logging

    setup_debug_logging()


@main.command(context_settings=CONTEXT)
@click.option("--site", "-s", "site_name", required=True, metavar="SITE",
              help="A site from the configuration, or any SSH host / ~/.ssh/config alias.")
@click.option("--cmd", "command", metavar="CMD",
              help="Run this command line in the run directory (remote login shell).")
@click.option("--template", "-t", metavar="NAME", help="Run the allowlisted template NAME.")
@click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE",
              help="A template parameter (repeat for several; repeat a list parameter).")
@click.option("--into", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Where the returned files go.")
@click.option("--keep", is_flag=True, help="Keep the remote directory even after success.")
@click.option("--follow", "-f", is_flag=True,
              help="Stream remote_program_exec.log while the entrypoint runs.")
@click.option("--transfer", type=click.Choice(["auto", "rsync", "sftp"]),
              help="How files move (default: the site's `transfer`, else auto).")
@click.option("--no-cache", is_flag=True,
              help="Send every input, even those the site's content cache holds (and add "
              "none to it); default: the site's `cache`, on for SSH sites, restricted ones too.")
@click.option("--config", "config_path", metavar="FILE", envvar=None,
              help="Configuration file (default: $REMOTE_EXEC_CONFIG, ./remote-exec.yaml, "
              "~/.config/remote-exec/sites.yaml).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable events on stderr.")
@click.option("--quiet", "-q", is_flag=True, help="Only errors and the remote log on failure.")
@click.option("--timeout", "timeout", metavar="DURATION",
              help="Limit for the whole run (e.g. 90s, 30m, 12h); when it expires the remote "
              "process group is stopped and remote-exec exits 124.")
@click.option("--retry", "retry", metavar="TRIES,MAX_INTERVAL",
              help="Reconnect attempts when the link drops, and the longest wait between "
              "them (default: the site's retry_tries,retry_max_interval, else 5,60s).")
@click.option("--stall-timeout", metavar="DURATION",
              help="Silence from the host after which the link counts as dead and is "
              "reopened (default: the site's stall_timeout, else 60s).")
@click.option("--no-holder", is_flag=True,
              help="Connect from this process instead of the per-user connection holder "
              "(also: REMOTE_EXEC_HOLDER=0).")
@click.option("--backend", "-b", type=_BackendName(),
              help="How the run is carried out: " + "; ".join(
                  f"{n}: {backends.get(n).summary}" for n in backends.choosable()) +
              f"; or an installed plugin's (default: the site's `backend`, else "
              f"{backends.DEFAULT}).")
@click.option("--resource", "-R", "resources", multiple=True, metavar="KEY=VALUE",
              help="A batch job's resource, over the site's `resources`: nodes, tasks, "
              "cpus_per_task, memory (4G), walltime (1:00:00, 30m), queue (partition / "
              "resource group), project (account / group). Repeat for several.")
@click.argument("inputs", nargs=-1, metavar="INPUT...")
def run(site_name: str, command: str | None, template: str | None, params: tuple[str, ...],
        into: Path, keep: bool, follow: bool, transfer: str | None, config_path: str | None,
        as_json: bool, quiet: bool, timeout: str | None, retry: str | None,
        stall_timeout: str | None, no_holder: bool, backend: str | None,
        resources: tuple[str, ...], inputs: tuple[str, ...], no_cache: bool) -> None:
    """Stage INPUTs, run the entrypoint remotely, and fetch the run directory back.

    \b
    What runs, in the run directory <root>/<uuid> on the site:
      --cmd CMD         a command line (as the legacy script did)
      --template NAME   a rendered template, if the site allows it
      (neither)         the site's entrypoint, by default
                        ~/misrc_remote_workflow/scripts/execute_remote-side_program_ssh.sh
    Output goes to remote_program_exec.log there. Inputs are files or directories;
    symlinks are followed and base names kept. Results come back into --into
    (default: here); inputs are never overwritten: unchanged ones do not come
    back, changed ones come back as NAME.returned; a result that would replace a
    local item of another type is kept aside (exit 74, `remote-exec resume RUN`
    places it once the local item is moved away).

    The entrypoint runs detached from the SSH session: if the link drops,
    remote-exec reconnects (--retry) and carries on; if remote-exec itself dies,
    `remote-exec resume RUN` finishes the run. Ctrl-C (or SIGTERM/SIGHUP) stops
    the remote process group (TERM, then KILL after the site's cancel_grace);
    a second Ctrl-C exits at once. Every run is listed by `remote-exec list`.

    \b
    With a batch backend (a scheduler over SSH or through its REST API, or
    a WebAPI: see --backend) the entrypoint runs as a batch job: resources
    come from the site's `resources` and -R; the job's queue state and reason show in
    `remote-exec status`; Ctrl-C and `remote-exec cancel` cancel the job.

    \b
    Exit status: 0 success; the entrypoint's own code when it fails;
    66 input error, 69 connection error, 73 staging error (also: a remote
    login shell whose output no sftp-server could be started past), 74 fetch or
    placing error (results kept; `resume` finishes),
    75 link lost or outcome unknown (resumable), 77 authentication / host key /
    the site refused, 78 configuration (or an unwritable state directory),
    124 --timeout expired, 130/143/129 cancelled by SIGINT/SIGTERM/SIGHUP.

    \b
    Examples:
      remote-exec run --site sandbox --cmd 'cat a b > out' a b
      remote-exec run --site lab -t generic -p program=~/bin/solver -p args=in.dat in.dat
      remote-exec run --site cluster -b slurm -R nodes=2 -R walltime=2h --cmd ./solve in.dat
    """
    from remote_exec.request import build_request
    from remote_exec.ui import Reporter

    ui = Reporter(quiet=quiet, as_json=as_json)
    try:
        site, _ = _resolve_site(config_path, site_name)
        request = build_request(site, command=command, template=template, params=params,
                                inputs=inputs, into=into, keep=keep, follow=follow,
                                transfer=transfer, backend=backend, resources=resources,
                                timeout=timeout, retry=retry, stall_timeout=stall_timeout,
                                no_cache=no_cache)
        result = _execute(request, ui, use_holder=not no_holder)
    except RemoteExecError as err:
        _fail(err, as_json)
    except KeyboardInterrupt:
        click.echo("remote-exec: interrupted", err=True)
        sys.exit(130)
    _report_result(result, site_name, into, as_json)


def _report_result(result: Any, site_name: str, into: Path, as_json: bool) -> NoReturn:
    if not result.ok:
        from remote_exec.run import read_log_tail

        if not as_json:
            why = getattr(result, "failure", "") or \
                f"the entrypoint failed with exit code {result.exit_code}"
            place = getattr(result, "place", "") or \
                f"remote directory {site_name}:{result.rundir}"
            kept = "kept" if result.remote_kept else "removed (cleanup: always)"
            click.echo(f"remote-exec: {why}; {place} {kept}", err=True)
            tail = read_log_tail(into)
            if tail:
                click.echo("---------- remote side log (last lines) ----------", err=True)
                click.echo(tail, err=True)
                click.echo("---------------------------------------------------", err=True)
    sys.exit(result.exit_code)


def _execute(request: Any, ui: Any, use_holder: bool = True, resume: bool = False) -> Any:
    from remote_exec.paths import writable_state_dir
    from remote_exec.run import execute

    writable_state_dir()  # the journal goes there: say so before contacting anything
    try:
        return execute(request, ui, use_holder=use_holder, resume=resume)
    except RemoteExecError:
        raise
    except Exception as exc:  # a bug: say so plainly, keep the traceback for a report
        import traceback

        traceback.print_exc()
        raise RemoteExecError(f"internal error: {exc!r}", hint="please report this") from exc


# -- the journal: list, status, logs, resume, cancel, cleanup ---------------------------------

def _find_run(run_id: str) -> Any:
    from remote_exec.journal import opened

    with opened() as journal:
        return journal.find(run_id)


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@main.command("list", context_settings=CONTEXT)
@click.option("--site", "-s", "site_name", metavar="SITE", help="Only runs on this site.")
@click.option("--limit", "-n", default=20, show_default=True, help="How many (newest first).")
@click.option("--active", is_flag=True, help="Only runs that are running or interrupted.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_cmd(site_name: str | None, limit: int, active: bool, as_json: bool) -> None:
    """List the recorded runs, newest first (the journal in the state directory)."""
    from remote_exec import manage
    from remote_exec.journal import ACTIVE_STATES, opened

    with opened() as journal:
        records = journal.runs(site=site_name, limit=limit or None,
                               states=ACTIVE_STATES if active else None)
    if as_json:
        import json

        for record in records:
            click.echo(json.dumps(manage.summary(record)))
        return
    if not records:
        click.echo("no runs recorded")
        return
    click.echo(f"{'RUN':10} {'SITE':12} {'STATE':12} {'PHASE':9} {'EXIT':>4}  "
               f"{'STARTED':19}  WHAT")
    for r in records:
        state = r.state + ("*" if r.state == "running" and not manage.driven(r) else "")
        code = "-" if r.exit_code is None else str(r.exit_code)
        click.echo(f"{r.id[:8]:10} {r.site[:12]:12} {state:12} {r.phase:9} {code:>4}  "
                   f"{_when(r.created_at):19}  {r.label[:60]}")
    if any(r.state == "running" and not manage.driven(r) for r in records):
        click.echo("* no remote-exec process drives it any more: `remote-exec resume RUN`")


@main.command("status", context_settings=CONTEXT)
@click.argument("run_id", metavar="RUN")
@click.option("--local", is_flag=True, help="Do not ask the remote host.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status_cmd(run_id: str, local: bool, as_json: bool) -> None:
    """Show one run: its journal record, its events and (unless --local) what the remote
    run directory says. RUN is a run id or a unique prefix of one."""
    import asyncio

    from remote_exec import manage
    from remote_exec.journal import opened

    try:
        record = _find_run(run_id)
        remote = None
        if not local and not record.ended:
            remote = asyncio.run(manage.probe(record))
    except RemoteExecError as err:
        _fail(err)
    if as_json:
        import json

        data = manage.summary(record)
        if remote is not None:
            data["remote"] = remote.__dict__
        click.echo(json.dumps(data, indent=2))
        return
    driven = manage.driven(record)
    click.echo(f"run       {record.id}")
    click.echo(f"site      {record.site} ({record.host})")
    click.echo(f"what      {record.label}")
    note = ""
    if not record.ended:
        note = (f" (driven by pid {record.driver_pid})" if driven else
                f" (no process drives it: `remote-exec resume {record.id[:8]}`)")
    click.echo(f"state     {record.state}{note}")
    click.echo(f"phase     {record.phase}")
    click.echo(f"exit code {'-' if record.exit_code is None else record.exit_code}")
    click.echo(f"remote    {record.rundir or '-'}")
    click.echo(f"into      {record.into_dir}")
    click.echo(f"created   {_when(record.created_at)}   launched {_when(record.launched_at)}"
               f"   ended {_when(record.ended_at)}")
    if record.job_id or record.backend not in (backends.DEFAULT, backends.RESTRICTED):
        job = manage.job_line(record)
        click.echo(f"backend   {record.backend}, job {record.job_id or '-'}")
        if job:
            click.echo(f"job       {job}")
    if record.error:
        click.echo(f"error     {record.error}")
    if remote is not None:
        click.echo(f"remotely  {remote.describe()}")
    with opened() as journal:
        events = journal.events(record.id)
    if events:
        click.echo("events:")
        for at, kind, message in events:
            click.echo(f"  {_when(at)}  {kind:11} {message}")


@main.command("logs", context_settings=CONTEXT)
@click.argument("run_id", metavar="RUN")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the entrypoint ends.")
def logs_cmd(run_id: str, follow: bool) -> None:
    """Print a run's remote_program_exec.log: the fetched copy once the run came back,
    else the one in the remote run directory (-f follows it while it grows)."""
    import asyncio

    from remote_exec import manage
    from remote_exec.ui import Reporter

    try:
        record = _find_run(run_id)
        path = manage.local_log(record)
        if path is not None:  # the run came back: nothing more will be written
            sys.stdout.write(path.read_text(encoding="utf-8", errors="replace"))
            return
        asyncio.run(manage.remote_log(record, Reporter(), follow))
    except RemoteExecError as err:
        _fail(err)
    except KeyboardInterrupt:
        sys.exit(130)


@main.command("resume", context_settings=CONTEXT)
@click.argument("run_id", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable events on stderr.")
@click.option("--quiet", "-q", is_flag=True, help="Only errors and the remote log on failure.")
@click.option("--no-holder", is_flag=True, help="Drive the run from this process.")
def resume_cmd(run_id: str, as_json: bool, quiet: bool, no_holder: bool) -> None:
    """Pick up a run whose remote-exec process died or lost the link, and finish it:
    wait for the entrypoint (started at most once), fetch, clean up. Exit status as
    for `run`."""
    from remote_exec.run import resume_request
    from remote_exec.ui import Reporter

    ui = Reporter(quiet=quiet, as_json=as_json)
    try:
        request = resume_request(run_id)
        result = _execute(request, ui, use_holder=not no_holder, resume=True)
    except RemoteExecError as err:
        _fail(err, as_json)
    except KeyboardInterrupt:
        sys.exit(130)
    _report_result(result, request.site.name, request.into, as_json)


@main.command("cancel", context_settings=CONTEXT)
@click.argument("run_id", metavar="RUN")
def cancel_cmd(run_id: str) -> None:
    """Stop a run: its remote process group gets TERM, then KILL after the site's
    cancel_grace. If a remote-exec process drives the run, that process is asked to
    cancel (it exits 143); otherwise the run is stopped from here."""
    from remote_exec import manage
    from remote_exec.ui import Reporter

    try:
        click.echo(manage.cancel(_find_run(run_id), Reporter()))
    except RemoteExecError as err:
        _fail(err)


@main.command("cleanup", context_settings=CONTEXT)
@click.argument("site_name", metavar="SITE")
@click.option("--older-than", default="7d", show_default=True, metavar="DURATION",
              help="Only directories older than this (e.g. 30d, 12h, 0 for all).")
@click.option("--dry-run", "-n", is_flag=True, help="Only list what would be removed.")
@click.option("--force", is_flag=True,
              help="Also remove directories whose results were never fetched (named).")
@click.option("--config", "config_path", metavar="FILE", help="Configuration file.")
def cleanup_cmd(site_name: str, older_than: str, dry_run: bool, force: bool,
                config_path: str | None) -> None:
    """Remove leftover run directories under the site's root on the remote host.

    Only directories remote-exec made (named by a run id, holding .remote-exec/)
    are considered, and never one whose run is active in the journal or whose
    entrypoint is still running. One whose entrypoint finished but whose results
    were never fetched is kept (`remote-exec resume RUN` fetches them) unless
    --force, which names each one it destroys. /tmp is wiped after 30 days anyway,
    but disks fill first.

    The site's content cache (<root>/.remote-exec-cache) is trimmed too: entries
    unused for the site's cache_max_age, then the least recently used beyond
    its cache_size, and, when --older-than is given, entries unused that long.
    --dry-run only lists them.
    """
    import asyncio

    from remote_exec import manage
    from remote_exec.config import parse_duration
    from remote_exec.sizes import size_text
    from remote_exec.ui import Reporter

    explicit = click.get_current_context().get_parameter_source("older_than") \
        == click.core.ParameterSource.COMMANDLINE
    try:
        site, _ = _resolve_site(config_path, site_name)
        found = asyncio.run(manage.cleanup(site, parse_duration(older_than), dry_run,
                                           Reporter(), manage.Guards.from_journal(), force))
        trimmed = asyncio.run(manage.trim_cache(
            site, parse_duration(older_than) if explicit else None, dry_run, Reporter()))
    except RemoteExecError as err:
        _fail(err)
    for item in found:
        click.echo(f"{item.verdict:17} {item.path}  ({item.state}, {item.age_days:.1f} days old)")
        if item.note:
            click.echo(f"{'':17} {item.note}")
    removed = sum(1 for f in found if f.verdict == "removed")
    click.echo(f"{removed} of {len(found)} run director{'y' if len(found) == 1 else 'ies'} "
               f"removed on {site_name}")
    for entry in trimmed:
        click.echo(f"{entry.verdict:17} {entry.path}  ({entry.why}, {size_text(entry.size)})")
    if trimmed:
        gone = [t for t in trimmed if t.verdict == "removed"]
        click.echo(f"{len(gone)} of {len(trimmed)} cache entr{'y' if len(trimmed) == 1 else 'ies'}"
                   f" removed ({size_text(sum(t.size for t in gone))}) from the content "
                   f"cache on {site_name}")
    unfetched = sum(1 for f in found if f.verdict == "kept (unfetched)")
    if unfetched:
        click.echo(f"{unfetched} kept: their results were never fetched; "
                   "`remote-exec resume RUN` fetches them, `--force` removes them anyway")


@main.command(context_settings={**CONTEXT, "ignore_unknown_options": True},
              add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def legacy(ctx: click.Context, args: tuple[str, ...]) -> None:
    """MInt drop-in: client_name:HOST client_cmd:CMD client_files:a,b,c

    Same arguments and exit codes (0 success, 1 failure) as MInt's
    execute_remote_command.sample.py; outputs land in the current directory; on
    failure the remote log is printed between marker lines. With $MISYSTEM_SITEID
    set, start / normal end / abnormal end lines go to solver_execute.log.
    """
    from remote_exec import legacy as lg

    parsed = _legacy_arguments(ctx, args, lg.parse, lg.USAGE)
    from remote_exec.config import DEFAULT_SOLVER_LOG_BASE
    from remote_exec.ui import Reporter

    ui = Reporter(quiet=bool(os.environ.get("REMOTE_EXEC_QUIET")))
    # until the configuration is read (and when it cannot be), the default base
    solver_log = lg.SolverLog(DEFAULT_SOLVER_LOG_BASE, parsed.solver)
    try:
        site, config = _resolve_site(None, parsed.client_name)
        solver_log = lg.SolverLog(config.solver_log_base, parsed.solver)
        request = lg.build(parsed, site, Path.cwd())
        solver_log.start()
        result = _execute(request, ui)
    except RemoteExecError as err:
        click.echo(f"remote-exec: error: {err}", err=True)
        solver_log.end(ok=False)  # after a start line, written now if it was not yet
        sys.exit(1)
    except KeyboardInterrupt:
        solver_log.end(ok=False)
        sys.exit(1)
    solver_log.end(ok=result.ok)
    _legacy_exit(result)


def _legacy_arguments(ctx: click.Context, args: tuple[str, ...],
                      parse: Callable[[list[str]], Any], usage: str) -> Any:
    """An old argument form's arguments (``parse``); its usage on --help (exit 0) or
    when some are missing (exit 1, as the originals did)."""
    if any(a in ("-h", "--help") for a in args):
        click.echo(ctx.get_help())
        click.echo("\n" + usage)
        sys.exit(0)
    parsed = parse(list(args))
    if parsed is None:
        click.echo(usage)
        sys.exit(1)
    return parsed


def _legacy_exit(result: Any) -> NoReturn:
    """An old argument form's end: 0 on success, else the remote log between marker
    lines and 1."""
    if result.ok:
        sys.exit(0)
    from remote_exec import legacy as lg
    from remote_exec.run import read_log_tail

    lg.print_remote_log(read_log_tail(Path.cwd(), lines=10**6))
    sys.exit(1)


@main.command("legacy-pull", context_settings={**CONTEXT, "ignore_unknown_options": True},
              add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def legacy_pull(ctx: click.Context, args: tuple[str, ...]) -> None:
    """MInt drop-in for a pull site: BASE_URL SITE_ID TOKEN COMMAND IN1:IN2 OUT1:OUT2

    The arguments of MInt's mi-system-wf.py (its WebAPI polling method); the run goes
    through the site's queue server (`backend: pull`) and the site's poller. Results
    named OUT... land in the current directory; exit 0 on success, 1 otherwise.
    """
    from remote_exec import legacy_pull as lp

    parsed = _legacy_arguments(ctx, args, lp.parse, lp.USAGE)
    from remote_exec.ui import Reporter

    ui = Reporter(quiet=bool(os.environ.get("REMOTE_EXEC_QUIET")))
    try:
        site, _ = _resolve_site(None, parsed.site_id)
        result = _execute(lp.build(parsed, site, Path.cwd()), ui)
    except RemoteExecError as err:
        click.echo(f"remote-exec: error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(1)
    _legacy_exit(result)


@main.group(context_settings=CONTEXT)
def sandbox() -> None:
    """A throwaway OpenSSH server on 127.0.0.1 to try real runs without a remote host.

    Keys and state live under ~/.local/state/remote-exec/sandbox
    ($REMOTE_EXEC_STATE_DIR overrides); the site `sandbox` is recorded in
    ~/.config/remote-exec/sites.yaml.
    """


@sandbox.command("up", context_settings=CONTEXT)
@click.option("--no-config", is_flag=True, help="Do not record the site in the user config.")
@click.option("--pull", is_flag=True,
              help="Instead: a local queue server and a site poller (the pull method), "
              "recorded as the site `sandbox-pull`.")
def sandbox_up(no_config: bool, pull: bool) -> None:
    """Start the sandbox sshd (if it is not running) and record the `sandbox` site.

    With --pull: a queue server on 127.0.0.1 (real TLS, a CA of its own) and a poller
    serving the site `sandbox-pull` (its allowlist pins the sample program and the
    `generic` template), so that `remote-exec run --site sandbox-pull` is a pull run.
    """
    if pull:
        from remote_exec.sandbox_pull import SITE_NAME, PullSandbox

        pulled = PullSandbox()
        try:
            definition = pulled.up()
            where = None if no_config else pulled.write_user_config()
        except RemoteExecError as err:
            _fail(err)
        click.echo(f"queue server on {definition['pull']['server']}, poller of site "
                   f"{SITE_NAME} running (state in {pulled.dir})")
        if where:
            click.echo(f"site {SITE_NAME!r} recorded in {where}")
        click.echo(f"try: remote-exec demo --backend pull, or remote-exec run --site "
                   f"{SITE_NAME} -t generic -p program=/bin/uname -p args=-a")
        return
    from remote_exec.sandbox import Sandbox

    box = Sandbox()
    try:
        was_running = box.running()
        site = box.up()
        where = None if no_config else box.write_user_config()
    except RemoteExecError as err:
        _fail(err)
    state = "already running" if was_running else "started"
    click.echo(f"sandbox sshd {state} on 127.0.0.1:{site['port']} (state in {box.dir})")
    if where:
        click.echo(f"site 'sandbox' recorded in {where}")
    click.echo("try: remote-exec run --site sandbox --cmd 'uname -a > uname.txt'")


@sandbox.command("down", context_settings=CONTEXT)
def sandbox_down() -> None:
    """Stop the sandbox sshd (and the pull sandbox's queue server and poller)."""
    from remote_exec.sandbox import Sandbox
    from remote_exec.sandbox_pull import PullSandbox

    click.echo("sandbox stopped" if Sandbox().down() else "sandbox was not running")
    if PullSandbox().down():
        click.echo("pull sandbox (queue server and poller) stopped")


@sandbox.command("status", context_settings=CONTEXT)
def sandbox_status() -> None:
    """Say whether the sandbox sshd is running, and where. Exit 0 if it is, 3 if not."""
    from remote_exec.sandbox import Sandbox

    box = Sandbox()
    if box.running():
        click.echo(f"running: pid {box.pid()} on 127.0.0.1:{box.port}; state in {box.dir}")
        sys.exit(0)
    click.echo(f"not running (state in {box.dir}); start it with `remote-exec sandbox up`")
    sys.exit(3)


@main.command(context_settings=CONTEXT)
@click.option("--into", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the results go (default: a new directory under the state dir).")
@click.option("--backend", type=click.Choice(backends.with_sandbox()), default="direct",
              show_default=True, help="direct: over SSH to the sandbox sshd; pull: through "
              "a local queue server and poller (`sandbox up --pull`).")
def demo(into: Path | None, backend: str) -> None:
    """Run the sample solver through the sandbox end to end and show what came back.

    Starts the sandbox if needed, writes three material-property inputs, runs the
    site's entrypoint (a sample Ramberg-Osgood curve solver) with them, and lists
    the returned files.
    """
    from remote_exec import demo as demo_mod

    try:
        code = demo_mod.run_demo(into, backend)
    except RemoteExecError as err:
        _fail(err)
    sys.exit(code)


@main.command("templates", context_settings=CONTEXT)
@click.argument("name", required=False)
def templates_cmd(name: str | None) -> None:
    """List the shipped templates, or show one template's parameters."""
    from remote_exec import templates

    try:
        if name is None:
            for tname in templates.available():
                click.echo(f"{tname:16} {templates.load_template(tname).description}")
            return
        tpl = templates.load_template(name)
    except RemoteExecError as err:
        _fail(err)
    click.echo(tpl.describe())


@main.group(context_settings=CONTEXT)
def holder() -> None:
    """The per-user connection holder that keeps SSH connections warm between runs.

    `remote-exec run` starts it on demand; it exits by itself after
    $REMOTE_EXEC_HOLDER_IDLE seconds without runs (default 120). Set
    REMOTE_EXEC_HOLDER=0 (or pass `run --no-holder`) to connect from each run instead.
    """


@holder.command("status", context_settings=CONTEXT)
def holder_status() -> None:
    """Show the holder's pid, pooled connections and runs. Exit 3 if none is running."""
    from remote_exec import holder as hd

    info = hd.status()
    if info is None:
        click.echo("no connection holder is running")
        sys.exit(3)
    click.echo(f"pid {info['pid']}: {info['active_runs']} active run(s), "
               f"{info['runs_done']} done, idle timeout {info['idle_timeout']:g} s")
    for dest, count in info["connections"].items():
        click.echo(f"  {dest}: {count} connection(s)")


@holder.command("stop", context_settings=CONTEXT)
def holder_stop() -> None:
    """Ask the holder to exit (runs in progress finish first)."""
    from remote_exec import holder as hd

    click.echo("holder stopping" if hd.stop() else "no connection holder is running")


# -- the remote side: install the restricted agent, check a site --------------------------------

@main.group("site", context_settings=CONTEXT)
def site_group() -> None:
    """Prepare and check a remote site.

    `site check` tells whether a site is ready; `site install` restricts a site's key
    to the remote-exec agent, so that it can only run the templates the site allows
    (pinned by sha256), move files in and out of one run directory, and never send
    back what the site marks as never returned.
    """


@site_group.command("install", context_settings=CONTEXT)
@click.argument("site_name", metavar="SITE")
@click.option("--apply", is_flag=True,
              help="Also put the forced-command line in the remote authorized_keys "
              "(replacing the key's current line), then check it.")
@click.option("--admin-identity", metavar="KEY",
              help="Log in with this key for the install (default: the site's own key, "
              "which must not be locked yet).")
@click.option("--authorized-keys", default="~/.ssh/authorized_keys", show_default=True,
              metavar="REMOTE_PATH", help="The authorized_keys file --apply edits.")
@click.option("--poller", is_flag=True,
              help="A pull site: write the poller's files into --output instead of "
              "installing over SSH (see below).")
@click.option("--output", metavar="DIR", type=click.Path(path_type=Path),
              help="With --poller: the new directory to write the files into.")
@click.option("--site-dir", default="/opt/remote-exec-poller", show_default=True,
              metavar="PATH", help="With --poller: where the files will be on the site.")
@click.option("--program", metavar="FILE", type=click.Path(path_type=Path, exists=True,
                                                            dir_okay=False),
              help="With --poller: a copy of the site's own program, pinned as the "
              "entrypoint `site`.")
@click.option("--user", "run_as", default="remote-exec", show_default=True, metavar="USER",
              help="With --poller: the account the systemd unit runs the poller as.")
@click.option("--config", "config_path", metavar="FILE", help="Configuration file.")
def site_install(site_name: str, apply: bool, admin_identity: str | None,
                 authorized_keys: str, poller: bool, output: Path | None, site_dir: str,
                 program: Path | None, run_as: str, config_path: str | None) -> None:
    """Install the restricted agent and the site's approved entrypoints on SITE.

    Copies remote-side_scripts/remote_exec_agent.py (standard library, Python >= 3.6)
    to the site's agent_dir, renders each template in the site's `templates` list
    (parameters come from the environment, never from the script text), pins every
    entrypoint by sha256 in agent_dir/allowlist.json together with the site's
    never_return / only_return patterns, and prints the authorized_keys line

        command="python3 .../remote_exec_agent.py --allowlist ...",restrict KEY

    that locks the site's key to the agent. Set `restricted: true` for the site once
    the line is in place. Re-run after changing templates or return patterns.

    \b
    A pull site (`backend: pull`, no inbound SSH) gets its files to install by hand:
      remote-exec site install SITE --poller --output DIR [--site-dir PATH]
    writes the poller, the agent, the rendered entrypoints, allowlist.json,
    poller.json and a systemd unit into DIR, for the site's administrator to put
    at --site-dir; the token comes from `remote-exec queue token add --role site`.
    """
    import asyncio

    from remote_exec.site import install

    if poller:
        _bundle_poller(site_name, config_path, output, site_dir, program, run_as)
        return
    try:
        site, _ = _resolve_site(config_path, site_name)
        report = asyncio.run(install.install(site, apply=apply, admin_identity=admin_identity,
                                             authorized_keys=authorized_keys))
    except RemoteExecError as err:
        _fail(err)
    click.echo(f"agent:     {site.name}:{report.agent_path} (run by {report.python})")
    click.echo(f"allowlist: {site.name}:{report.allowlist_path}")
    for name, digest in report.entrypoints.items():
        click.echo(f"  approved {name:14} sha256 {digest}")
    for warning in report.warnings:
        click.echo(f"remote-exec: warning: {warning}", err=True)
    if report.applied_to is None:
        click.echo("\nPut this line in the remote authorized_keys in place of the key's "
                   "current line (or run again with --apply):\n")
        click.echo(report.key_line)
        return
    click.echo(f"locked the site's key in {site.name}:{report.applied_to}")
    verified = report.verified or {}
    click.echo(f"checked: the key now reaches agent {verified.get('version')} "
               f"with {len(verified.get('entrypoints') or {})} approved entrypoint(s)")
    if not site.restricted:
        click.echo(f"next: set `restricted: true` for site {site.name!r} in "
                   f"{site.defined_in or 'your configuration'}")


def _bundle_poller(site_name: str, config_path: str | None, output: Path | None,
                   site_dir: str, program: Path | None, run_as: str) -> None:
    """``site install --poller``: the pull site's files, and what to do with them."""
    from remote_exec.site import poller_bundle

    if output is None:
        _fail(ConfigError("--poller needs --output DIR (a new directory for the files)"))
    try:
        site, _ = _resolve_site(config_path, site_name)
        report = poller_bundle.bundle(site, output, site_dir, program, user=run_as)
    except RemoteExecError as err:
        _fail(err)
    click.echo(f"wrote the poller's files for site {site.name} into {output}")
    for name, digest in report.entrypoints.items():
        click.echo(f"  approved {name:14} sha256 {digest}")
    for warning in report.warnings:
        click.echo(f"remote-exec: warning: {warning}", err=True)
    click.echo(f"""
On the site, as its administrator:
  1. copy {output}/ to {site_dir}/ (owned by {run_as}, mode 0700)
  2. put the token of `remote-exec queue token add --role site --site {site.name}`
     (run on the queue server) into {site_dir}/token, mode 0600
  3. check: python3 {site_dir}/{poller_bundle.POLLER_FILE} --config {site_dir}/poller.json --check
  4. install {site_dir}/remote-exec-poller.service in /etc/systemd/system/, then
     systemctl enable --now remote-exec-poller
     (a proxy: add Environment=https_proxy=http://proxy:3128 to the unit)

{site_dir}/remote-exec-poller.service:
{report.unit}""")


@site_group.command("check", context_settings=CONTEXT)
@click.argument("site_name", metavar="SITE")
@click.option("--json", "as_json", is_flag=True, help="One JSON list of rows.")
@click.option("--config", "config_path", metavar="FILE", help="Configuration file.")
def site_check(site_name: str, as_json: bool, config_path: str | None) -> None:
    """Check that SITE is ready: host key, authentication, agent and allowlist (on a
    restricted site), rsync and Python on the host, runs root writable, free space.
    Each failing row says how to fix it. Exit status 1 if any row failed."""
    import asyncio
    import json

    from remote_exec.site import check

    try:
        site, _ = _resolve_site(config_path, site_name)
        rows = asyncio.run(check.check(site))
    except RemoteExecError as err:
        _fail(err, as_json)
    if as_json:
        click.echo(json.dumps(check.as_dicts(rows), indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"site {site.name} ({site.display})", show_lines=False)
        for column in ("check", "status", "detail", "fix"):
            table.add_column(column, overflow="fold")
        colour = {check.OK: "green", check.WARN: "yellow", check.FAIL: "bold red"}
        for row in rows:
            style = colour.get(row.status, "dim")
            table.add_row(row.check, f"[{style}]{row.status}[/]", row.detail, row.fix)
        Console().print(table)
    sys.exit(1 if check.failed(rows) else 0)


# -- each backend's own commands (e.g. `remote-exec fujitsu ...`), from the registry ----------

def _attach_backend_commands() -> None:

    for name in backends.names():
        target = backends.get(name).commands
        if target:
            main.add_command(backends.resolve(target))


_attach_backend_commands()
