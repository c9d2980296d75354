"""The single file's entry point (remote_exec/frozen.py): which command lines are the
interpreter forms remote-exec uses to start helpers of its own, and which are the CLI's.
The built file itself is tested in tests/test_single_file.py."""

from __future__ import annotations

import inspect

from remote_exec import frozen
from remote_exec.holder import client
from remote_exec.ssh import rsync


def test_the_holder_command_of_the_client_is_understood():
    assert frozen.interpreter_module([*client.SERVER_COMMAND]) == ("remote_exec.holder", [])


def test_the_rsync_bridge_is_understood_wherever_it_was_unpacked():
    # the bridge is named by its path in the copy unpacked by the instance that started
    # rsync, not in this instance's own copy
    bridge = "/tmp/_MEIabc/remote_exec/ssh/rsh_bridge.py"
    assert frozen.interpreter_module(["-S", "-E", bridge, "/tmp/s", "host", "rsync"]) == (
        "remote_exec.ssh.rsh_bridge", ["/tmp/s", "host", "rsync"])
    assert frozen.interpreter_module(["-S", "-E", str(rsync.BRIDGE), "/tmp/s"]) == (
        "remote_exec.ssh.rsh_bridge", ["/tmp/s"])
    # how rsync.py starts it: the flags this entry point skips
    source = inspect.getsource(rsync.rsync_tunnel)
    assert '"-S", "-E", str(BRIDGE)' in source


def test_anything_else_is_the_cli():
    for argv in (["legacy", "client_name:x"], ["--version"], [], ["-m"],
                 ["-m", "json.tool"], ["-m", "remote_execx"],
                 ["-S", "/tmp/x.py"], ["-S", "-E", "/tmp/remote_exec/nope.py"],
                 ["-S", "-E", "/tmp/remote_exec/../os.py"],
                 ["run", "/tmp/remote_exec/ssh/rsh_bridge.py"]):
        assert frozen.interpreter_module(argv) is None, argv
