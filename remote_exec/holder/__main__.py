"""``python -m remote_exec.holder``: the holder process (see :mod:`remote_exec.holder.server`)."""

from remote_exec.holder.server import main

main()
