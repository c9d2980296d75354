"""remote-exec: run a MInt module's remote step over one SSH connection.

A run is asked for with :mod:`remote_exec.request` and carried out by
:mod:`remote_exec.run` (signals; through the connection holder or in this process);
its life is the phase loop of :mod:`remote_exec.engine` over one of the ways of
running in :mod:`remote_exec.backends` (one interface, one registry); the SSH
plumbing is in :mod:`remote_exec.ssh`.
Importing this package is cheap on purpose: heavy modules (asyncssh, rich) are
imported only by the code paths that need them.
"""

__version__ = "0.1.0"
