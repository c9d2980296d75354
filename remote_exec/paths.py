"""Where remote-exec keeps its files on the local machine (XDG base directories)."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """Per-user state: sandbox keys, host facts, (later) the run journal.

    ``$REMOTE_EXEC_STATE_DIR`` overrides it (tests use that to stay isolated).
    """
    env = os.environ.get("REMOTE_EXEC_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "remote-exec"


def user_config_file() -> Path:
    """The per-user site configuration file, ``~/.config/remote-exec/sites.yaml``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "remote-exec" / "sites.yaml"


def _share_dirs() -> list[Path]:
    """Directories that may hold the shipped ``templates/`` and ``remote-side_scripts/``."""
    import sys

    here = Path(__file__).resolve().parent
    return [here.parent, Path(sys.prefix) / "share" / "remote-exec"]


def shipped_dir(name: str) -> Path:
    """The shipped directory ``name`` (``templates`` or ``remote-side_scripts``).

    Found beside the package in a source checkout or an editable install, else
    under ``<prefix>/share/remote-exec`` for a regular install.
    """
    for base in _share_dirs():
        candidate = base / name
        if candidate.is_dir():
            return candidate
    return _share_dirs()[0] / name


def local_user() -> str:
    """The local user name, as ssh would default to."""
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("USER", "user")
