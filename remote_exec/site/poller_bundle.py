"""``remote-exec site install SITE --poller``: the files a pull site's administrator installs.

A pull site accepts no inbound SSH, so nothing is copied to it: this writes a directory
(``--output``) for the administrator to put on the site as it is (at ``--site-dir``):

  remote_exec_poller.py    the poller (one standard-library file, Python >= 3.6);
  remote_exec_agent.py     the agent, whose code the poller enforces the allowlist with;
  entrypoints/NAME.sh      each template the site allows, rendered without values;
  allowlist.json           what may run: entrypoints pinned by sha256, typed parameters,
                           the runs root, never/only return patterns (as for a
                           restricted SSH site: the same file, the same checks);
  poller.json              the queue server, the CA, the token file, the allowlist;
  mint-ca.pem              the queue server's CA (when the site's pull.ca_file is set);
  remote-exec-poller.service  a systemd unit.

The token is not written: the site administrator puts the one
``remote-exec queue token add --role site --site SITE`` printed into ``token`` (0600).
"""

from __future__ import annotations

import json
import os
import posixpath
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remote_exec.agent_file import AGENT_FILE
from remote_exec.config import Site
from remote_exec.errors import ConfigError
from remote_exec.paths import shipped_dir
from remote_exec.site.install import SITE_ENTRY, allowlist_text, site_entry, template_entries

POLLER_FILE = "remote_exec_poller.py"
POLLER_CONFIG = "poller.json"
UNIT = "remote-exec-poller.service"
DEFAULT_SITE_DIR = "/opt/remote-exec-poller"


@dataclass
class BundleReport:
    directory: Path
    site_dir: str
    entrypoints: dict[str, str] = field(default_factory=dict)  # name -> sha256
    unit: str = ""
    warnings: list[str] = field(default_factory=list)


def unit_text(site: Site, site_dir: str, python: str, user: str) -> str:
    """A systemd unit that keeps the poller running. ``KillMode=process``: stopping or
    restarting the poller leaves running entrypoints alone (a new poller re-attaches)."""
    command = " ".join(shlex.quote(w) for w in (
        python, posixpath.join(site_dir, POLLER_FILE),
        "--config", posixpath.join(site_dir, POLLER_CONFIG)))
    return (f"[Unit]\nDescription=remote-exec poller of site {site.name} (takes its runs "
            "from the MInt queue server over HTTPS)\n"
            "After=network-online.target\nWants=network-online.target\n\n"
            f"[Service]\nType=simple\nUser={user}\nExecStart={command}\n"
            "Restart=always\nRestartSec=10\nKillMode=process\n\n"
            "[Install]\nWantedBy=multi-user.target\n")


def bundle(site: Site, output: Path, site_dir: str = DEFAULT_SITE_DIR,
           program: Path | None = None, python: str = "/usr/bin/python3",
           user: str = "remote-exec") -> BundleReport:
    """Write the poller's files for ``site`` into ``output`` (made, or empty)."""
    settings = site.settings.get("pull")
    if not settings:
        raise ConfigError(f"site {site.name!r} has no `pull:` section",
                          hint="a pull site names its queue server (pull.server) first")
    if not posixpath.isabs(site_dir):
        raise ConfigError(f"--site-dir {site_dir!r} must be an absolute path on the site")
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"{output} is not empty", hint="give a new or empty directory")
    output.mkdir(parents=True, exist_ok=True, mode=0o700)
    report = BundleReport(directory=output, site_dir=site_dir)
    scripts = shipped_dir("remote-side_scripts")
    for name in (AGENT_FILE, POLLER_FILE):
        shutil.copyfile(scripts / name, output / name)
        os.chmod(output / name, 0o700)
    (output / "entrypoints").mkdir(mode=0o700)
    entries: dict[str, Any] = {}
    for name, _path, body, entry in template_entries(site, site_dir):
        local = output / "entrypoints" / f"{name}.sh"
        local.write_bytes(body)
        local.chmod(0o500)
        entries[name] = entry
    if program is not None:
        entries[SITE_ENTRY] = site_entry(site.entrypoint, program.read_bytes())
    else:
        report.warnings.append(
            f"the site's own program ({site.entrypoint}) is not pinned: runs without "
            "--template are refused until it is (give --program FILE, a copy of it)")
    _write(output / "allowlist.json", allowlist_text(site, site.root, site_dir, entries))
    ca_file = None
    if settings.get("ca_file"):
        shutil.copyfile(os.path.expanduser(settings["ca_file"]), output / "mint-ca.pem")
        ca_file = "mint-ca.pem"
    config = {"version": 1, "server": str(settings["server"]).rstrip("/"),
              "token_file": "token", "ca_file": ca_file, "client_cert": None,
              "client_key": None, "proxy": "env", "allowlist": "allowlist.json",
              "agent": None, "slots": 1, "wait": 25, "state": "poller-state",
              "log": "poller.log", "cleanup": site.cleanup}
    _write(output / POLLER_CONFIG, (json.dumps(config, indent=2) + "\n").encode("utf-8"))
    report.unit = unit_text(site, site_dir, python, user)
    _write(output / UNIT, report.unit.encode("utf-8"))
    report.entrypoints = {n: e["sha256"] for n, e in entries.items()}
    return report


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


__all__ = ["DEFAULT_SITE_DIR", "POLLER_CONFIG", "POLLER_FILE", "BundleReport", "bundle",
           "unit_text"]
