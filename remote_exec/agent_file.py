"""The remote-side agent, loaded as a module: where the rules both sides apply live.

``remote-side_scripts/remote_exec_agent.py`` is one standard-library file (Python
>= 3.6) that a restricted site installs as it is. What the client must decide exactly
as the agent does is written there once and imported from here: the return filter
(:mod:`remote_exec.returns`), the typed-parameter rules (:mod:`remote_exec.templates`)
and the protocol's exit codes and control-file names (:mod:`remote_exec.entrypoint`).
Importing the agent has no side effects. This module imports nothing of remote-exec
but :mod:`remote_exec.paths`, so anything may import it.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from types import ModuleType

from remote_exec.paths import shipped_dir

AGENT_FILE = "remote_exec_agent.py"


@lru_cache(maxsize=1)
def agent_module() -> ModuleType:
    """The remote-side agent, imported as a module (it has no import-time effects)."""
    path = shipped_dir("remote-side_scripts") / AGENT_FILE
    spec = importlib.util.spec_from_file_location("remote_exec_agent", path)
    if spec is None or spec.loader is None:  # pragma: no cover - a broken install
        raise ImportError(f"cannot load the remote-side agent from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("remote_exec_agent", module)
    spec.loader.exec_module(module)
    return module
