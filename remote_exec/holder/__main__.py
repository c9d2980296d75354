"""``python -m remote_exec.holder``: the holder process (see :mod:`remote_exec.holder.server`).

The holder lock is taken first, with the standard library only: a holder started
while another serves the state directory exits before importing the engine.
"""

from remote_exec.holder.client import claim_lock, socket_path

_lock = claim_lock(socket_path())
if _lock is not None:
    from remote_exec.holder.server import main

    main(_lock)
