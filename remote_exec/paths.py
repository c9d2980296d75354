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


def writable_state_dir() -> Path:
    """The state directory, created if need be; a ConfigError (78) naming it and the fix
    when it cannot be written (read-only, not a directory, no permission)."""
    import tempfile

    directory = state_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise state_dir_error(directory, exc) from None
    return directory


def state_dir_error(directory: Path, exc: BaseException) -> Exception:
    """The ConfigError for a state directory that cannot be written."""
    from remote_exec.errors import ConfigError

    why = getattr(exc, "strerror", None) or str(exc)
    return ConfigError(
        f"the state directory {directory} is not writable ({why}): remote-exec keeps "
        "its run journal and locks there",
        hint="make it writable, or point REMOTE_EXEC_STATE_DIR at a writable directory",
    )


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


def read_private(path: Path, what: str) -> str:
    """The text of a file holding a secret (a token, credentials), which only its owner
    may read: a ConfigError naming the file and the fix when it cannot be read or when
    its group or others may read it."""
    import stat

    from remote_exec.errors import ConfigError

    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}",
                          hint="create it (mode 0600) or fix the site's setting") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"the {what} {path} is readable by others "
                          f"(mode {stat.S_IMODE(info.st_mode):o})", hint=f"chmod 600 {path}")
    return text
