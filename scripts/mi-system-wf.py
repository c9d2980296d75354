#!/usr/bin/env python3
"""Drop-in for MInt's mi-system-wf.py (the WebAPI polling method): forwards to
`remote-exec legacy-pull`, which runs the computation through a pull site's queue server.

    mi-system-wf.py BASE_URL SITE_ID TOKEN COMMAND IN1:IN2 OUT1:OUT2 [PARAMETER]

remote-exec is found as execute_remote_command.sample.py (beside this file) finds it:
a `remote-exec` executable beside this script, `remote-exec` on PATH, or this Python's
`-m remote_exec`. Exit status 0 on success, 1 otherwise. Runs on Python 3.6.
"""
import importlib.util
import os
import sys


def _forwarder():
    here = os.path.dirname(os.path.realpath(__file__))
    path = os.path.join(here, "execute_remote_command.sample.py")
    spec = importlib.util.spec_from_file_location("execute_remote_command_sample", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    sys.exit(_forwarder().main("legacy-pull"))
