"""MInt's WebAPI argument form: ``BASE_URL SITE_ID TOKEN COMMAND IN1:IN2 OUT1:OUT2 [PARAMETER]``.

What a module's program (A) passes to MInt's ``mi-system-wf.py`` to have a pull site run
a computation; ``remote-exec legacy-pull`` (and ``scripts/mi-system-wf.py``, which calls
it) takes the same arguments and runs a ``pull`` run instead:

* ``SITE_ID`` names a site of the configuration with ``backend: pull`` (its queue server,
  CA and submit token come from its ``pull:`` section);
* ``COMMAND`` must be one of the site's ``pull.legacy_commands`` (the original kept this
  list on the MInt server, per site); it names the approved entrypoint the site's poller
  runs (a template name, or ``site`` for the site's own program), or
  ``{entrypoint: NAME, params: [KEY=VALUE, ...]}`` with the template's parameters;
* ``IN1:IN2`` are the input files (the current directory's, as the original read them);
* ``OUT1:OUT2`` are the only result names that come back (with the run's log), into the
  current directory;
* ``BASE_URL`` and ``TOKEN`` are accepted and not used: the original's token is MInt's
  own API token, which the queue server cannot check; the site's ``pull:`` section says
  where and how to connect. ``PARAMETER`` was never passed to the site's program by the
  original either; a non-empty one is refused rather than dropped silently.

Exit status as the original: 0 when the computation ended normally, 1 otherwise.
"""

from __future__ import annotations

import dataclasses
import glob
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from remote_exec.errors import ConfigError
from remote_exec.inputs import LOG_NAME

if TYPE_CHECKING:
    from remote_exec.config import Site
    from remote_exec.request import RunRequest

USAGE = """\
Remote execution through a pull site (drop-in for MInt's mi-system-wf.py)
Usage:
  remote-exec legacy-pull BASE_URL SITE_ID TOKEN COMMAND IN1[:IN2...] OUT1[:OUT2...] [PARAMETER]
     BASE_URL  : MInt's WebAPI URL (not used: the site's pull.server is)
     SITE_ID   : a site of the remote-exec configuration with backend: pull
     TOKEN     : MInt's API token (not used, never printed: the site's pull.token_file is)
     COMMAND   : one of the site's pull.legacy_commands (mapped to an approved entrypoint)
     IN...     : input files, ':'-separated
     OUT...    : the result files that come back, ':'-separated
"""


@dataclass
class PullArgs:
    base_url: str
    site_id: str
    command: str
    inputs: list[str]
    outputs: list[str]
    parameter: str = ""


def parse(argv: list[str]) -> PullArgs | None:
    """The arguments, or None when some are missing (the usage case). The token is
    dropped here, so that nothing after this keeps it."""
    if len(argv) not in (6, 7):
        return None
    base_url, site_id, _token, command, inputs, outputs = argv[:6]
    return PullArgs(base_url, site_id, command, _split(inputs), _split(outputs),
                    argv[6] if len(argv) == 7 else "")


def _split(text: str) -> list[str]:
    return [part for part in text.split(":") if part.strip()]


def build(args: PullArgs, site: Site, into: Path) -> RunRequest:
    """The run request for ``args`` on the pull site ``site``."""
    from remote_exec import backends
    from remote_exec.backends.pull.settings import SECTION
    from remote_exec.request import build_request

    if backends.get(backends.for_site(site)).section != SECTION:
        raise ConfigError(f"site {site.name!r} is not a pull site (its backend is "
                          f"{backends.for_site(site)!r})",
                          hint="legacy-pull runs through a queue server: give the site "
                          "`backend: pull` and a `pull:` section")
    commands = dict((site.settings.get(SECTION) or {}).get("legacy_commands") or {})
    entry = commands.get(args.command)
    if entry is None:
        known = ", ".join(sorted(commands)) or "none"
        raise ConfigError(f"command {args.command!r} is not one of site {site.name!r}'s "
                          f"legacy_commands (known: {known})",
                          hint="map it to an approved entrypoint in the site's "
                          "pull.legacy_commands")
    if args.parameter.strip():
        raise ConfigError("the PARAMETER argument is not supported (the original never "
                          "passed it to the site's program either)",
                          hint="give the values as template parameters of the entrypoint")
    if not args.outputs:
        raise ConfigError("no result file named (OUT1:OUT2...)")
    if isinstance(entry, str):
        entry = {"entrypoint": entry}
    name = entry["entrypoint"]
    template = None if name == "site" else name
    request = build_request(site, template=template, params=list(entry.get("params") or []),
                            inputs=args.inputs, into=into, command_option="COMMAND")
    # exactly these names come back (as the original's result_files), and the log
    returns = [glob.escape(name) for name in args.outputs]
    return dataclasses.replace(request, returns=[*returns, LOG_NAME])


__all__ = ["USAGE", "PullArgs", "build", "parse"]
