"""Stand-in scheduler commands for tests: see :mod:`fakesched` (``fakesched.py``).

``install(bindir)`` puts ``qsub``, ``qstat``, ``qdel``, ``pjsub``, ``pjstat`` and
``pjdel`` into ``bindir``: small Python launchers (this interpreter) that import
``fakesched.py`` and run it under their own name, so ``os.path.basename(argv[0])``
picks the tool. Put ``bindir`` first on ``PATH`` and set ``FAKESCHED_DIR``
(``FAKESCHED_FLAVOR=torque`` turns the q-commands into Torque's).
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "fakesched.py"
TOOLS = ("qsub", "qstat", "qdel", "pjsub", "pjstat", "pjdel")

_LAUNCHER = """#!{python}
import sys
sys.path.insert(0, {here!r})
import fakesched
sys.exit(fakesched.main())
"""


def install(bindir: Path) -> None:
    """Create one executable launcher per tool in ``bindir`` (made if missing)."""
    bindir = Path(bindir)
    bindir.mkdir(parents=True, exist_ok=True)
    text = _LAUNCHER.format(python=sys.executable, here=str(HERE))
    for tool in TOOLS:
        path = bindir / tool
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
