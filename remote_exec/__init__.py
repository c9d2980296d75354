"""remote-exec: run a MInt module's remote step over one SSH connection.

The run life cycle lives in :mod:`remote_exec.run`, the SSH plumbing in
:mod:`remote_exec.ssh`, where the entrypoint runs in :mod:`remote_exec.backends`.
Importing this package is cheap on purpose: heavy modules (asyncssh, rich) are
imported only by the code paths that need them.
"""

__version__ = "0.1.0"
