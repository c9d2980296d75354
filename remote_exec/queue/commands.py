"""``remote-exec queue ...``: the queue server of the pull method and its administration.

Attached to ``remote-exec`` through the registry's ``commands`` field (the ``pull``
backend's line). Imports only click at import time; aiohttp and the server are imported
when a command runs.
"""

from __future__ import annotations

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group("queue", context_settings=CONTEXT)
def group() -> None:
    """The queue server of the pull method (sites that accept no inbound SSH)."""
