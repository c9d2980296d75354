#!/usr/bin/env python3
"""Build ``dist/remote-exec``: remote-exec as one self-contained executable (PyInstaller).

For a MInt node whose system Python is older than remote-exec needs (>= 3.9): the
file carries its own Python, remote-exec and its dependencies (asyncssh with
cryptography, click, jinja2, pyyaml, fastjsonschema, jsonschema, rich), the templates,
the remote-side scripts and the job script templates. Copy it beside the wrappers
(``scripts/execute_remote_command.sample.py`` / ``.sh``), which look there first.

    python3 -m pip install pyinstaller    # once, in a Python that has remote-exec's dependencies
    python3 scripts/build_single_file.py  # -> dist/remote-exec

Build it on a machine as old as the nodes it is for (the file needs the glibc it was
built against, or a newer one). The file's entry point is :mod:`remote_exec.frozen`
(how it starts its connection holder and rsync's remote shell). boto3, which only
the ``fujitsu`` backend needs, is left out unless ``--with-fujitsu`` is given (it
makes the file 47 MB instead of 32 MB, and each start 1.7 s instead of 0.7 s).
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NAME = "remote-exec"


def pyinstaller_args(dist: Path, work: Path, with_fujitsu: bool) -> list:
    sep = os.pathsep
    args = [
        "--onefile", "--name", NAME, "--noconfirm", "--clean", "--log-level", "WARN",
        "--distpath", str(dist), "--workpath", str(work / "build"), "--specpath", str(work),
        "--paths", str(REPO),
        # the backend registry, the CLI's backend commands and the configuration load
        # modules by name (importlib.import_module): take the whole package
        "--collect-submodules", "remote_exec",
        # the job script templates (read through importlib.resources)
        "--add-data", f"{REPO / 'remote_exec' / 'backends' / 'batch_scripts'}{sep}"
                      "remote_exec/backends/batch_scripts",
        # found beside the package (remote_exec/paths.py): templates and the agent file
        "--add-data", f"{REPO / 'templates'}{sep}templates",
        "--add-data", f"{REPO / 'remote-side_scripts'}{sep}remote-side_scripts",
        # jsonschema lists every error of a broken configuration; its metaschemas are data
        "--collect-data", "jsonschema_specifications",
        # asyncssh imports some of its modules (ciphers, key types) by name
        "--collect-submodules", "asyncssh",
    ]
    if not with_fujitsu:
        args += ["--exclude-module", "boto3", "--exclude-module", "botocore",
                 "--exclude-module", "s3transfer"]
    for unused in ("tkinter", "pytest", "moto", "flask", "IPython"):
        args += ["--exclude-module", unused]
    args.append(str(REPO / "remote_exec" / "frozen.py"))
    return args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", type=Path, default=REPO / "dist",
                        help="where to put the file (default: dist/ of the checkout)")
    parser.add_argument("--with-fujitsu", action="store_true",
                        help="include boto3 for the fujitsu backend")
    options = parser.parse_args(argv)
    try:
        import PyInstaller  # noqa: F401
    except ImportError:
        print(f"build_single_file: PyInstaller is not installed for {sys.executable}: "
              f"run `{sys.executable} -m pip install pyinstaller`", file=sys.stderr)
        return 1
    dist = options.dist.resolve()
    with tempfile.TemporaryDirectory(prefix="remote-exec-build-") as work:
        # PYTHONPATH first: this checkout, not another remote-exec that is installed
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
        proc = subprocess.run(
            [sys.executable, "-m", "PyInstaller", *pyinstaller_args(dist, Path(work),
                                                                    options.with_fujitsu)],
            cwd=work, env=env)
        if proc.returncode != 0:
            print("build_single_file: PyInstaller failed (see above)", file=sys.stderr)
            return 1
    built = dist / NAME
    print(f"built {built} ({built.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
