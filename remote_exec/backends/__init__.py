"""Every way of running a run, behind one interface, found through one registry.

The interface is :class:`remote_exec.backends.base.Backend`: the steps a run needs
(create the run place, stage, launch once, wait, read the log, fetch, remove,
cancel) and what the commands around a run need (``status``, ``logs``, ``cancel``,
``cleanup``, ``site check``). :mod:`remote_exec.engine` is the phase loop over it and
names no particular backend.

The registry below is the one list of backends: the CLI's ``--backend`` choices, the
configuration schema's ``backend`` values and the engine all read it. A line names
the class (imported on first use, so loading the configuration imports no SSH code)
and what must be known before importing it. Backends from other packages register
through the ``remote_exec.backends`` entry point group (``NAME = module:Class``),
looked up only when a name is not built in.

Built in:

  ``direct``   a detached process group on the SSH host (:mod:`.direct`);
  ``slurm``, ``pbs``, ``torque``, ``pjm``  a batch job of the site's scheduler over SSH
               (:mod:`.batch`, one class parameterised by a :class:`.scheduler.Scheduler`;
               one module per scheduler for its commands and formats);
  ``slurmrest`` a Slurm job submitted, asked about and cancelled through a REST API
               (slurmrestd, or the FRCE kind), the run directory over SSH
               (:mod:`.slurmrest`); on a restricted site ``slurmrest-agent`` stands for
               it: the agent stages, fetches and starts the approved entrypoint inside
               the job (:mod:`.slurmrest.restricted`);
  ``agent``    a restricted site: every step is a request to the agent the site
               installed (:mod:`.agent`); chosen by the site's ``restricted: true``;
  ``fujitsu``  the Fujitsu Cloud Service HPC WebAPI: files through its object storage,
               the job through its REST calls (:mod:`.fujitsu`);
  ``rescale``  a Rescale job through its REST API, on demand or on a persistent cluster
               (:mod:`.rescale`).

Adding one: a module with a :class:`~.base.Backend` subclass (and its job script
template, if any), and one :class:`Registered` line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from remote_exec.errors import ConfigError

if TYPE_CHECKING:
    from remote_exec.backends.base import Backend
    from remote_exec.config import Site

#: the entry point group other packages register their backends in
ENTRY_POINT_GROUP = "remote_exec.backends"


@dataclass(frozen=True)
class Registered:
    """One backend: where its class is and what is known of it before importing it."""

    name: str
    target: str  # "module:Class"
    summary: str  # one line for --help and errors
    options: dict[str, Any] = field(default_factory=dict)  # keywords for the class
    #: whether a user picks it by name (--backend, the site's `backend`); the agent is
    #: picked by the site's `restricted: true` instead
    choosable: bool = True
    #: whether it takes a batch job's resources (-R, the site's `resources`)
    takes_resources: bool = False
    #: whether it travels over SSH (runs go through the connection holder)
    over_ssh: bool = True
    #: whether its site runs only entrypoints the site approved (the request names an
    #: approved entrypoint and its raw parameters instead of carrying a script)
    approved_only: bool = False
    #: its settings section in a site (e.g. ``fujitsu:``) and that section's schema
    #: ("module:ATTR"), validated with the configuration
    section: str = ""
    section_schema: str = ""
    #: that section's own check ("module:function"), called as ``function(values, where)``
    #: with the section's values (None when absent) when the site uses this backend or
    #: has the section; raises a ConfigError
    section_check: str = ""
    #: extra commands of this backend ("module:attr" of a click group), attached to
    #: ``remote-exec`` by the CLI under the group's name
    commands: str = ""
    #: the local stand-in of a site for ``remote-exec demo --backend NAME`` ("module:Class"
    #: with ``site_name``, ``up()`` giving the site's definition, and ``describe(definition)``)
    sandbox: str = ""
    #: the backend that stands for this one on a restricted site (the site's agent does
    #: what needs the host there); empty: not supported on restricted sites
    restricted_as: str = ""

    def load(self) -> type[Backend]:
        cls: type[Backend] = resolve(self.target)
        return cls


def resolve(target: str) -> Any:
    """The object a registry line names as "module:ATTR" (imported on first use)."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _scheduler(name: str, title: str) -> Registered:
    return Registered(name, "remote_exec.backends.batch:BatchBackend",
                      f"a {title} batch job over SSH", options={"scheduler": name},
                      takes_resources=True)


#: the registry: every built-in backend, one line each
BUILT_IN: tuple[Registered, ...] = (
    Registered("direct", "remote_exec.backends.direct:DirectBackend",
               "a detached process on the SSH host", sandbox="remote_exec.sandbox:Sandbox"),
    _scheduler("slurm", "Slurm"),
    _scheduler("pbs", "PBS Pro"),
    _scheduler("torque", "Torque"),
    _scheduler("pjm", "Fujitsu PJM"),
    Registered("slurmrest", "remote_exec.backends.slurmrest.backend:SlurmRestBackend",
               "a Slurm job through slurmrestd or an FRCE-style REST API (files over SSH)",
               takes_resources=True, section="slurmrest",
               section_schema="remote_exec.backends.slurmrest.settings:SCHEMA",
               section_check="remote_exec.backends.slurmrest.settings:check_section",
               restricted_as="slurmrest-agent"),
    Registered("slurmrest-agent",
               "remote_exec.backends.slurmrest.restricted:RestrictedSlurmRestBackend",
               "slurmrest on a restricted site (the agent stages, fetches and starts the "
               "approved entrypoint in the job)", choosable=False, takes_resources=True),
    Registered("agent", "remote_exec.backends.agent:AgentBackend",
               "a restricted site's agent (the site's `restricted: true`)", choosable=False),
    Registered("fujitsu", "remote_exec.backends.fujitsu.backend:FujitsuBackend",
               "the Fujitsu HPC WebAPI and its object storage", takes_resources=True,
               over_ssh=False, section="fujitsu",
               section_schema="remote_exec.backends.fujitsu.settings:SCHEMA",
               section_check="remote_exec.backends.fujitsu.settings:check_section",
               commands="remote_exec.backends.fujitsu.commands:group"),
    Registered("pull", "remote_exec.backends.pull.backend:PullBackend",
               "a site's poller takes the run from a queue server over HTTPS (no inbound SSH)",
               over_ssh=False, approved_only=True, section="pull",
               section_schema="remote_exec.backends.pull.settings:SCHEMA",
               section_check="remote_exec.backends.pull.settings:check_section",
               commands="remote_exec.queue.commands:group",
               sandbox="remote_exec.sandbox_pull:PullSandbox"),
    Registered("rescale", "remote_exec.backends.rescale.backend:RescaleBackend",
               "a Rescale job through its REST API (on demand or a persistent cluster)",
               over_ssh=False, section="rescale",
               section_schema="remote_exec.backends.rescale.settings:SCHEMA",
               section_check="remote_exec.backends.rescale.settings:check_section"),
)

_REGISTRY: dict[str, Registered] = {r.name: r for r in BUILT_IN}
_plugins_loaded = False

#: the backend of a site that names none
DEFAULT = "direct"
#: the backend of a restricted site
RESTRICTED = "agent"


def register(entry: Registered) -> None:
    """Add a backend (a plugin's, or a test's)."""
    _REGISTRY[entry.name] = entry


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name not in _REGISTRY:
            cls = point.load()
            register(Registered(point.name, point.value, getattr(cls, "summary", point.name),
                                **getattr(cls, "registration", {})))


def get(name: str) -> Registered:
    """The backend ``name``; a ConfigError naming the known ones if there is none."""
    if name not in _REGISTRY:
        _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}",
                          hint="known backends: " + ", ".join(choosable())) from None


def names() -> list[str]:
    """Every built-in backend's name (plugins are looked up by name on use)."""
    return list(_REGISTRY)


def choosable() -> list[str]:
    """The names a user may give (--backend, a site's `backend`)."""
    return [r.name for r in _REGISTRY.values() if r.choosable]


def with_sandbox() -> list[str]:
    """The backends ``remote-exec demo`` can show on this machine."""
    return [r.name for r in _REGISTRY.values() if r.sandbox]


def sections() -> dict[str, str]:
    """Settings sections of sites (``fujitsu:``) -> their schema's "module:ATTR"."""
    return {r.section: r.section_schema for r in _REGISTRY.values() if r.section}


def for_site(site: Site, override: str | None = None) -> str:
    """The backend a run on ``site`` uses: --backend ``override`` over the site's
    `backend`; a restricted site's agent, which nothing overrides."""
    name = override or site.backend or DEFAULT
    entry = get(name)
    if site.restricted:
        if name == DEFAULT:
            return RESTRICTED
        if entry.restricted_as:
            return entry.restricted_as
        takers = [r.name for r in _REGISTRY.values() if r.restricted_as]
        raise ConfigError(f"site {site.name!r} is restricted: its agent runs approved "
                          f"entrypoints itself; backend {name!r} is not supported there",
                          hint="drop --backend (or the site's `backend`); on a restricted "
                          f"site the agent also works with: {', '.join(takers)}")
    if not entry.choosable:
        raise ConfigError(f"backend {name!r} cannot be chosen: {entry.summary}")
    return name


def make_backend(name: str, site: Site, run_id: str = "",
                 resources: dict[str, Any] | None = None) -> Backend:
    """The backend ``name`` for one run on ``site`` (``resources``: a batch job's,
    validated). A plain ``Backend(site)`` serves the commands around runs."""
    entry = get(name)
    return entry.load()(site, run_id=run_id, resources=resources or {}, **entry.options)


__all__ = ["BUILT_IN", "DEFAULT", "ENTRY_POINT_GROUP", "RESTRICTED", "Registered", "choosable",
           "for_site", "get", "make_backend", "names", "register", "resolve", "sections",
           "with_sandbox"]

