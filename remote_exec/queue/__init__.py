"""The queue server of the pull method (``remote-exec queue ...``), on the MInt side.

Sites that accept no inbound SSH run the poller (``remote-side_scripts/remote_exec_poller.py``),
which takes their runs from this server over outbound HTTPS; runs with ``backend: pull``
put their jobs here. The protocol is ``docs/pull-protocol.md``.
"""
