"""Where and how the entrypoint runs. One module per backend.

A backend launches the wrapper written by :mod:`remote_exec.entrypoint` in a
staged run directory and returns the entrypoint's exit code. Only ``direct``
exists so far; batch schedulers and the Fujitsu WebAPI follow the same shape.
"""

from __future__ import annotations

from remote_exec.backends.direct import DirectBackend

BACKENDS = {"direct": DirectBackend}
