"""A run as asked (:class:`RunRequest`) and as it ended (:class:`RunResult`), the one
function that builds a request (:func:`build_request`, for ``run``, ``legacy``, ``demo``
and every backend), and the request as JSON: what the holder's wire carries and the
journal keeps. Imports nothing above the configuration (no SSH code), so every layer
may use it."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from remote_exec import backends
from remote_exec.config import TRANSFER_METHODS, Site, parse_duration
from remote_exec.entrypoint import Entrypoint
from remote_exec.errors import ConfigError
from remote_exec.inputs import Input


@dataclass
class RunRequest:
    """Everything decided before the first packet."""

    site: Site
    inputs: list[Input]
    entrypoint: Entrypoint
    into: Path
    keep: bool = False
    follow: bool = False
    backend: str = backends.DEFAULT
    timeout: float | None = None  # seconds for the whole run, from created_at
    returns: list[str] = field(default_factory=lambda: ["**"])  # the template's patterns
    resources: dict[str, Any] = field(default_factory=dict)  # a batch job's (Resources)
    run_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    created_at: float = field(default_factory=time.time)


@dataclass
class RunResult:
    """What happened. ``exit_code`` is the entrypoint's own."""

    run_id: str
    rundir: str
    exit_code: int
    fetched: list[str]
    remote_kept: bool
    stage_method: str = ""
    fetch_method: str = ""
    skipped: list[str] = field(default_factory=list)
    failure: str = ""  # why it failed, when more is known than the exit code
    place: str = ""  # the run place in words ("remote directory lab:/tmp/ID"), if known

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


# -- building one ----------------------------------------------------------------------------

def build_request(site: Site, *, command: str | None = None, template: str | None = None,
                  params: Sequence[str] = (), inputs: Sequence[str] = (),
                  into: Path = Path("."), keep: bool = False, follow: bool = False,
                  transfer: str | None = None, backend: str | None = None,
                  resources: Sequence[str] = (), timeout: str | float | None = None,
                  retry: str | None = None, stall_timeout: str | float | None = None,
                  no_cache: bool = False, command_option: str = "--cmd") -> RunRequest:
    """The request for one run on ``site``, every part of it checked before anything is
    contacted (a ConfigError, or an InputError for ``inputs``).

    What runs: ``command`` (a command line), ``template`` with ``params`` (``KEY=VALUE``),
    or neither (the site's entrypoint); a restricted site runs only what its agent
    approved. ``backend`` overrides the site's (``--backend``); ``resources`` are
    ``KEY=VALUE`` pairs over the site's `resources`, for a backend that takes them.
    ``transfer``, ``retry`` (``TRIES[,MAX_INTERVAL]``), ``stall_timeout`` and
    ``no_cache`` (send every input, ignoring the site's content cache) are this run's own
    settings: they go on a copy of ``site``, which stays as configured.
    ``timeout`` limits the whole run (a duration). ``command_option`` names how the
    caller's user gave ``command``, for messages (``legacy`` says ``client_cmd``).
    """
    from remote_exec.inputs import check_inputs

    if command is not None and template is not None:
        raise ConfigError("give either --cmd or --template, not both")
    if params and template is None:
        raise ConfigError("--param needs --template")
    site = _run_site(site, transfer, retry, stall_timeout, no_cache)
    name, chosen = _backend(site, backend, tuple(resources))
    approved = site.restricted or backends.get(name).approved_only
    entry, returns = _entrypoint(site, command, template, tuple(params), command_option,
                                 approved)
    checked = check_inputs(list(inputs))
    return RunRequest(site=site, inputs=checked, entrypoint=entry, into=Path(into).absolute(),
                      keep=keep, follow=follow, returns=list(returns), backend=name,
                      resources=chosen, timeout=_seconds(timeout))


def _seconds(value: str | float | None) -> float | None:
    if value is None or value == "":
        return None
    return float(value) if isinstance(value, (int, float)) else parse_duration(value)


def _run_site(site: Site, transfer: str | None, retry: str | None,
              stall_timeout: str | float | None, no_cache: bool = False) -> Site:
    """``site`` with this run's own settings: a copy, the configured one untouched."""
    changes: dict[str, Any] = {}
    if no_cache:
        changes["cache"] = False
    if transfer:
        if transfer not in TRANSFER_METHODS:
            raise ConfigError(f"invalid --transfer {transfer!r}",
                              hint="one of " + ", ".join(TRANSFER_METHODS))
        changes["transfer"] = transfer
    stall = _seconds(stall_timeout)
    if stall is not None:
        changes["stall_timeout"] = max(stall, 1.0)
    if retry:
        tries, _, interval = retry.partition(",")
        if not tries.strip().isdigit():
            raise ConfigError(f"invalid --retry {retry!r}",
                              hint="give TRIES or TRIES,MAX_INTERVAL, e.g. --retry 5,60s")
        changes["retry_tries"] = int(tries)
        if interval.strip():
            changes["retry_max_interval"] = max(parse_duration(interval), 0.1)
    return dataclasses.replace(site, **changes) if changes else site


def _entrypoint(site: Site, command: str | None, template: str | None,
                params: tuple[str, ...], command_option: str,
                approved: bool) -> tuple[Entrypoint, list[str]]:
    """What runs on ``site``, and the patterns of what comes back. ``approved``: the site
    runs only entrypoints it approved (a restricted site's agent, a pull site's poller),
    so the request names them instead of carrying a script."""
    if template is not None:
        from remote_exec import templates

        if template not in site.templates:
            allowed = ", ".join(site.templates) or "none"
            raise ConfigError(
                f"template {template!r} is not allowed on site {site.name!r}",
                hint=f"allowed templates: {allowed} (the site's `templates` list)",
            )
        tpl = templates.load_template(template)
        values = tpl.bind(list(params))  # refuses bad values before connecting
        if approved:
            return Entrypoint("approved", f"template {template} (approved by the site)",
                              template, params=_raw_params(tpl, params)), list(tpl.returns)
        return Entrypoint("template", f"template {template}", tpl.render(values)), \
            list(tpl.returns)
    if command is not None and approved and command.strip() != site.entrypoint:
        who = "its agent" if site.restricted else "its poller"
        raise ConfigError(
            f"site {site.name!r} is restricted: {who} runs only the entrypoints the site "
            f"approved, not a command line ({command_option}); nothing was contacted",
            hint=f"`remote-exec run --site {site.name} INPUT…` runs the site's approved "
            f"entrypoint; add `--template NAME` for an approved template (allowed: "
            f"{', '.join(site.templates) or 'none'})")
    if approved:  # no command, or exactly the site's own entrypoint
        return Entrypoint("approved", "the site's approved entrypoint", "site"), ["**"]
    if command is not None:
        if not command.strip():
            raise ConfigError(f"{command_option} is empty")
        return Entrypoint("command", f"command {command!r}", command), ["**"]
    return Entrypoint("site", f"site entrypoint {site.entrypoint}", site.entrypoint), ["**"]


def _raw_params(tpl: Any, pairs: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as the agent takes them: text, or a list for list parameters."""
    raw: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if tpl.parameters[key].type == "list":
            raw.setdefault(key, []).append(value)
        else:
            raw[key] = value
    return raw


def _backend(site: Site, override: str | None,
             pairs: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """The run's backend (the registry's choice for ``site`` and ``override``) and its
    resources (``pairs`` over the site's `resources`, for a backend that takes them)."""
    name = backends.for_site(site, override)
    given: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"invalid --resource {pair!r}", hint="give KEY=VALUE, e.g. "
                              "-R walltime=1:00:00")
        given[key.strip()] = value.strip()
    if not backends.get(name).takes_resources:
        if given:
            takers = [n for n in backends.choosable() if backends.get(n).takes_resources]
            raise ConfigError(
                "--resource is for batch jobs",
                hint=f"site {site.name!r} is restricted: its agent takes no resources"
                if site.restricted else "choose a backend that takes them with --backend "
                f"(or the site's `backend`): {', '.join(takers)}")
        return name, {}
    from remote_exec.backends.scheduler import Resources

    merged = Resources.parse(site.resources, f"site {site.name!r} resources").merged(
        Resources.parse(given, "--resource"))
    return name, asdict(merged)


# -- the request as JSON (the holder's wire and the journal's record) -----------------------

def request_to_wire(request: RunRequest) -> dict[str, Any]:
    data = asdict(request)
    data["into"] = str(request.into)
    data["inputs"] = [{**asdict(i), "source": os.path.abspath(i.source)} for i in request.inputs]
    return data


def request_from_wire(data: dict[str, Any]) -> RunRequest:
    return RunRequest(
        site=Site.from_wire(data["site"]),
        inputs=[Input(source=Path(i["source"]), name=i["name"], is_dir=i["is_dir"],
                      size=i["size"]) for i in data["inputs"]],
        entrypoint=Entrypoint(**data["entrypoint"]),
        into=Path(data["into"]), keep=data["keep"], follow=data["follow"],
        backend=data["backend"], timeout=data.get("timeout"), run_id=data["run_id"],
        returns=data.get("returns") or ["**"], resources=data.get("resources") or {},
        created_at=data.get("created_at") or time.time(),
    )
