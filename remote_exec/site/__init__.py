"""Preparing and checking a remote site: ``remote-exec site install`` and ``site check``.

  :mod:`remote_exec.site.install`  puts the restricted agent, the approved entrypoints
                                   and the allowlist on the host, and locks the key;
  :mod:`remote_exec.site.check`    reports, row by row, whether the site is ready.

The agent itself is ``remote-side_scripts/remote_exec_agent.py``; its client is
:mod:`remote_exec.backends.agent`.
"""
