#!/usr/bin/env python3
"""Drop-in for MInt's execute_remote_command.sample.py: forwards to `remote-exec legacy`."""
import os
import sys

os.execvp("remote-exec", ["remote-exec", "legacy", *sys.argv[1:]])
