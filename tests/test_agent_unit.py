"""The restricted remote-side agent (``remote-side_scripts/remote_exec_agent.py``), locally.

No sshd: every test runs the agent as sshd would run a forced command, as a subprocess
with ``SSH_ORIGINAL_COMMAND`` set, against a scratch allowlist, run root and state
directory, with ``HOME`` pointing to a scratch directory. Entrypoints are small sh
scripts written here and pinned by their real sha256. rsync is real: its ``-e`` program
is a small helper that drops the host name and runs the agent with the remaining words
as ``SSH_ORIGINAL_COMMAND``, the way sshd joins them.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "remote-side_scripts" / "remote_exec_agent.py"
#: the Python that runs the agent (e.g. a Python 3.6, to run this whole file against it)
AGENT_PYTHON = os.environ.get("REMOTE_EXEC_AGENT_PYTHON", sys.executable)

def _import_agent():
    spec = importlib.util.spec_from_file_location("remote_exec_agent", AGENT)
    module = importlib.util.module_from_spec(spec)
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = saved
    return module


agent_module = _import_agent()

ONLY_AGENT = "this key runs only the remote-exec agent (commands: hello, create, status, "

GENERIC = r"""#!/bin/sh
printf '%s\n' "$RE_args" > args.txt
printf '%s\n' "$RE_program" > program.txt
printf 'n=%s flag=%s unset=%s\n' "$RE_n" "${RE_flag-unset}" "${RE_code-unset}" > env.txt
env > fullenv.txt
echo "generic ran in $(pwd)"
echo result > result.txt
echo key > secret.key
mkdir -p secret sub/deeper
echo hidden > secret/inner.txt
echo odb > sub/deeper/model.odb
ln -s /etc/passwd link_out
ln -s result.txt link_in
exit "${RE_code:-0}"
"""

SLEEPER = r"""#!/bin/sh
i=0
while [ "$i" -lt "$RE_seconds" ]; do
  echo "tick $i"
  sleep 0.2
  i=$((i + 1))
done
echo done
"""

FAKE_SSH = r"""import os, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):
    args = args[2:] if args[0] in ("-l", "-p") else args[1:]
env = dict(os.environ, SSH_ORIGINAL_COMMAND=" ".join(args[1:]))
os.execve(%(python)r, [%(python)r, %(agent)r, "--allowlist", %(allowlist)r], env)
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Site:
    """A scratch installation of the agent: allowlist, root, state, log, entrypoints."""

    def __init__(self, tmp: Path, python: str = AGENT_PYTHON):
        self.tmp = tmp
        self.python = python
        self.home = tmp / "home"
        self.home.mkdir()
        (self.home / "canary").mkdir()
        self.conf = tmp / "agent"
        self.conf.mkdir()
        self.root = tmp / "runs"
        self.state = self.conf / "state"
        self.log = self.conf / "agent.log"
        self.allowlist = self.conf / "allowlist.json"
        self.generic = self.conf / "generic.sh"
        self.generic.write_text(GENERIC)
        self.sleeper = self.conf / "sleeper.sh"
        self.sleeper.write_text(SLEEPER)
        self.spec = {
            "version": 1,
            "root": str(self.root),
            "state": str(self.state),
            "log": str(self.log),
            "entrypoints": {
                "generic": {
                    "path": str(self.generic),
                    "sha256": sha256(self.generic),
                    "interpreter": ["/bin/sh"],
                    "parameters": {
                        "program": {"type": "path", "required": True,
                                    "pattern": "[A-Za-z0-9_./~+-]+"},
                        "args": {"type": "list", "items": "string", "default": []},
                        "n": {"type": "int", "min": 1, "max": 10, "default": 2},
                        "flag": {"type": "bool"},
                        "code": {"type": "int"},
                    },
                    "returns": ["**"],
                },
                "sleeper": {
                    "path": str(self.sleeper),
                    "sha256": sha256(self.sleeper),
                    "parameters": {"seconds": {"type": "int", "min": 0, "default": 50}},
                },
            },
            "returns": {"never": ["*.key", "secret/**"], "only": []},
        }
        self.save()

    def save(self) -> None:
        self.allowlist.write_text(json.dumps(self.spec, indent=1))

    def env(self, command: str | None) -> dict:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home),
               "SSH_CONNECTION": "192.0.2.7 50000 192.0.2.1 22", "LANG": "C.UTF-8"}
        if command is not None:
            env["SSH_ORIGINAL_COMMAND"] = command
        return env

    def argv(self) -> list[str]:
        return [self.python, str(AGENT), "--allowlist", str(self.allowlist)]

    def run(self, command: str | None, stdin: object = None,
            timeout: float = 30) -> subprocess.CompletedProcess:
        data = json.dumps(stdin).encode() if isinstance(stdin, dict) else stdin
        return subprocess.run(self.argv(), input=data, capture_output=True,
                              env=self.env(command), timeout=timeout, cwd=self.tmp)

    def ok(self, command: str, stdin: object = None) -> dict:
        proc = self.run(command, stdin)
        assert proc.returncode == 0, proc.stderr.decode()
        return json.loads(proc.stdout)

    def refused(self, command: str | None, stdin: object = None, code: int = 2) -> str:
        proc = self.run(command, stdin)
        err = proc.stderr.decode()
        assert proc.returncode == code, (proc.returncode, err, proc.stdout)
        assert "Traceback" not in err
        if code == 2:
            assert err.startswith("remote-exec agent: refused: "), err
            assert err.count("\n") == 1, err
        return err

    def launch(self, run_id: str, name: str, params: dict) -> subprocess.CompletedProcess:
        return self.run(f"launch {run_id} {name}", params)

    def launch_background(self, run_id: str, name: str, params: dict) -> subprocess.Popen:
        proc = subprocess.Popen(self.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE,
                                env=self.env(f"launch {run_id} {name}"))
        proc.stdin.write(json.dumps(params).encode())
        proc.stdin.close()
        line = proc.stdout.readline().decode()
        assert re.fullmatch(r"started [0-9]+\n", line), (line, proc.stderr.read())
        return proc

    def new_run(self) -> str:
        run_id = str(uuid.uuid4())
        assert self.ok("create " + run_id) == {"rundir": str(self.root / run_id),
                                                "existed": False}
        return run_id

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def wait_for(self, predicate, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


# ---------------------------------------------------------------------------------------
# The file itself
# ---------------------------------------------------------------------------------------

def test_vermin_says_python_3_6() -> None:
    vermin = shutil.which("vermin")
    if not vermin:
        pytest.skip("vermin is not installed")
    proc = subprocess.run([vermin, "-t=3.6-", "--no-tips", "--violations", str(AGENT)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run([vermin, "--no-tips", str(AGENT)], capture_output=True, text=True)
    found = re.search(r"Minimum required versions: 3\.(\d+)", proc.stdout)
    assert found and int(found.group(1)) <= 6, proc.stdout


def test_the_agent_imports_only_the_standard_library() -> None:
    import ast

    tree = ast.parse(AGENT.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            names.add((node.module or "").split(".")[0])
    assert names, "the agent imports something"
    assert names <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)


def test_import_has_no_side_effects(tmp_path: Path) -> None:
    before = sorted(os.listdir(AGENT.parent))
    code = ("import importlib.util, sys\n"
            "s = importlib.util.spec_from_file_location('agent', sys.argv[1])\n"
            "m = importlib.util.module_from_spec(s)\n"
            "s.loader.exec_module(m)\n"
            "print(m.AGENT_VERSION, callable(m.match_pattern), callable(m.is_returned),"
            " callable(m.build_outbox))\n")
    env = dict(os.environ, SSH_ORIGINAL_COMMAND="create 11111111-2222-3333-4444-555555555555",
               HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-B", "-c", code, str(AGENT)], capture_output=True,
                          text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "2 True True True\n"
    assert proc.stderr == ""
    assert sorted(os.listdir(AGENT.parent)) == before
    assert os.listdir(tmp_path) == []


def test_version(site: Site) -> None:
    proc = subprocess.run([site.python, str(AGENT), "--version"], capture_output=True,
                          text=True)
    assert proc.returncode == 0
    assert proc.stdout == f"remote-exec-agent {agent_module.AGENT_VERSION}\n"


def test_the_client_and_the_agent_share_their_exit_statuses() -> None:
    """The agent is one standard-library file (it cannot import the client): the
    protocol's exit statuses are written on both sides and must agree."""
    from remote_exec.backends.agent import REFUSED
    from remote_exec.entrypoint import ALREADY_LAUNCHED

    assert agent_module.EXIT_ALREADY_LAUNCHED == ALREADY_LAUNCHED
    assert agent_module.EXIT_REFUSED == REFUSED


def _python36() -> str | None:
    candidates = [shutil.which("python3.6")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.6*/bin/python3.6")))
    for candidate in candidates:
        if not candidate:
            continue
        try:
            proc = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                  capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if proc.returncode == 0 and proc.stdout.strip() == "(3, 6)":
            return candidate
    return None


def test_runs_on_python_3_6(tmp_path: Path) -> None:
    python = _python36()
    if python is None:
        pytest.skip("no Python 3.6 on this machine")
    site = Site(tmp_path, python=python)
    assert site.ok("hello")["python"].startswith("3.6.")
    run_id = site.new_run()
    proc = site.launch(run_id, "generic", {"program": "/bin/true", "args": ["x"]})
    assert proc.returncode == 0, proc.stderr.decode()
    assert site.ok("wait " + run_id) == {"exit_code": 0}
    site.refused("id")
    assert site.ok("remove " + run_id) == {"removed": True}


# ---------------------------------------------------------------------------------------
# Configuration and control commands
# ---------------------------------------------------------------------------------------

def test_hello(site: Site) -> None:
    hello = site.ok("hello")
    assert hello["agent"] == "remote-exec-agent"
    assert hello["version"] == agent_module.AGENT_VERSION
    assert re.fullmatch(r"3\.\d+\.\d+", hello["python"])
    assert hello["rsync"] is None or hello["rsync"].startswith("rsync")
    assert hello["root"] == str(site.root) and site.root.is_dir()
    assert (site.root.stat().st_mode & 0o777) == 0o700
    assert (site.state.stat().st_mode & 0o777) == 0o700
    assert hello["root_writable"] is True
    assert isinstance(hello["free_bytes"], int) and hello["free_bytes"] > 0
    assert hello["allowlist"] == str(site.allowlist)
    generic = hello["entrypoints"]["generic"]
    assert generic["digest_ok"] is True
    assert generic["sha256"] == sha256(site.generic)
    assert generic["path"] == str(site.generic)
    assert generic["parameters"]["n"] == {"type": "int", "min": 1, "max": 10, "default": 2}
    assert generic["returns"] == ["**"]
    assert hello["entrypoints"]["sleeper"]["returns"] == ["**"]
    assert hello["returns"] == {"never": ["*.key", "secret/**"], "only": []}
    assert hello["agent_forwarding"] is False
    assert hello["home"] == str(site.home)
    assert hello["user"]
    line = site.log_lines()[-1]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ pid=\d+ from=192\.0\.2\.7 "
                    r"command='hello' ok$", line), line
    assert (site.log.stat().st_mode & 0o777) == 0o600


def test_bad_allowlists(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.allowlist.write_text("{not json")
    err = site.refused("hello", code=1)
    assert "error:" in err and str(site.allowlist) in err and "JSON" in err
    del site.spec["root"]
    site.save()
    err = site.refused("hello", code=1)
    assert "'root'" in err and str(site.allowlist) in err
    site.spec["root"] = str(tmp_path)  # the state directory would be inside it
    site.save()
    err = site.refused("hello", code=1)
    assert "inside 'root'" in err
    site.spec["root"] = str(site.root)
    site.spec["entrypoints"]["generic"]["parameters"]["n"]["default"] = 11  # above max
    site.save()
    err = site.refused("hello", code=1)
    assert "'n'" in err and "maximum" in err
    site.allowlist.unlink()
    err = site.refused("hello", code=1)
    assert str(site.allowlist) in err and "cannot be read" in err


def test_create_status_remove(site: Site) -> None:
    run_id = site.new_run()
    rundir = site.root / run_id
    assert rundir.is_dir() and (site.state / run_id).is_dir()
    assert (rundir.stat().st_mode & 0o777) == 0o700
    again = site.ok("create " + run_id)
    assert again == {"rundir": str(rundir), "existed": True}
    status = site.ok("status " + run_id)
    assert status == {"exists": True, "rundir": str(rundir), "launched": False,
                      "cancelled": False, "entrypoint": None, "pgid": None, "alive": None,
                      "exit_code": None, "started_at": None, "batch": False,
                      "job_id": None, "job_host": None, "job_command": None,
                      "job_output": None}
    (listed,) = site.ok("list")["runs"]
    assert listed.pop("age_seconds") in (0, 1, 2)
    assert listed == {"id": run_id, "state": "not launched", "exit_code": None}
    (rundir / "sub").mkdir()
    (rundir / "sub" / "f").write_text("x")
    assert site.ok("remove " + run_id) == {"removed": True}
    assert not rundir.exists() and not (site.state / run_id).exists()
    assert site.ok("remove " + run_id) == {"removed": False}
    assert site.ok("status " + run_id)["exists"] is False
    # a directory the agent did not make is not the client's to take over or delete
    other = str(uuid.uuid4())
    (site.root / other).mkdir()
    assert "not made by the remote-exec agent" in site.refused("create " + other)
    assert "not made by the remote-exec agent" in site.refused("remove " + other)
    assert (site.root / other).is_dir()
    assert site.ok("list")["runs"] == []


@pytest.mark.parametrize("bad", [
    "../x", "..", "ABCDEF01-2345-6789-abcd-ef0123456789", "not-a-uuid", "/tmp",
    "11111111-2222-3333-4444-55555555555", "11111111-2222-3333-4444-555555555555/..",
    "11111111-2222-3333-4444-555555555555x", "~",
])
def test_invalid_run_ids_refused(site: Site, bad: str) -> None:
    commands = ["create", "status"]
    if bad == "../x":
        commands += ["remove", "wait", "log", "cancel", "launch"]
    for command in commands:
        err = site.refused(f"{command} '{bad}'" + (" generic" if command == "launch" else ""))
        assert "invalid run id" in err
    assert os.listdir(site.root) == []
    assert not (site.tmp / "x").exists()


def test_extra_arguments_refused(site: Site) -> None:
    run_id = site.new_run()
    for command in ("hello x", f"create {run_id} x", f"status {run_id} x", "list x",
                    f"remove {run_id} x", f"wait {run_id} x", f"cancel {run_id} 1 2",
                    f"cancel {run_id} -1", f"log {run_id} --offset",
                    f"log {run_id} --offset x", f"log {run_id} --bogus",
                    f"launch {run_id}", f"launch {run_id} generic x", "create"):
        err = site.refused(command)
        assert "usage" in err or "GRACE" in err or "--offset" in err, (command, err)


# ---------------------------------------------------------------------------------------
# launch
# ---------------------------------------------------------------------------------------

def test_launch_end_to_end(site: Site) -> None:
    run_id = site.new_run()
    rundir = site.root / run_id
    args = ["first arg", "; rm -rf ~/canary", "$(touch pwned)", "'quoted'"]
    proc = site.launch(run_id, "generic",
                       {"program": "~/bin/solver", "args": args, "flag": "YES", "code": "5"})
    assert proc.returncode == 5, proc.stderr.decode()
    assert re.fullmatch(rb"started [0-9]+\n", proc.stdout)
    pgid = int(proc.stdout.split()[1])
    assert (site.home / "canary").is_dir()
    assert not (rundir / "pwned").exists() and not (site.tmp / "pwned").exists()
    assert (rundir / "args.txt").read_text() == "\n".join(args) + "\n"
    assert (rundir / "program.txt").read_text() == str(site.home / "bin/solver") + "\n"
    assert (rundir / "env.txt").read_text() == "n=2 flag=1 unset=5\n"
    env = dict(line.split("=", 1) for line in (rundir / "fullenv.txt").read_text().splitlines()
               if "=" in line and not line.startswith((" ", "\t")))
    assert env["REMOTE_EXEC_RUN_ID"] == run_id
    assert env["REMOTE_EXEC_RUN_DIR"] == str(rundir)
    assert "SSH_ORIGINAL_COMMAND" not in env
    params = json.loads(Path(env["REMOTE_EXEC_PARAMS"]).read_text())
    assert params == {"program": str(site.home / "bin/solver"), "args": args, "n": 2,
                      "flag": True, "code": 5}
    log = (rundir / "remote_program_exec.log").read_bytes()
    assert log == (f"generic ran in {rundir}\n").encode()
    status = site.ok("status " + run_id)
    assert status["launched"] and status["exit_code"] == 5 and status["pgid"] == pgid
    assert status["entrypoint"] == "generic" and status["alive"] is False
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", status["started_at"])
    assert site.ok("wait " + run_id) == {"exit_code": 5}
    offset = site.run(f"log {run_id} --offset 7")
    assert offset.returncode == 0 and offset.stdout == log[7:]
    assert site.run(f"log {run_id} --offset 100000").stdout == b""
    assert site.ok("list")["runs"][0]["state"] == "finished"
    launched = [line for line in site.log_lines() if " launched pgid " in line]
    assert len(launched) == 1
    assert launched[0].endswith(f"launched pgid {pgid} (entrypoint generic; parameters: args, "
                                "code, flag, n, program)")
    assert "rm -rf" not in site.log.read_text()  # values are never logged
    # the second launch of the same run never runs anything
    (rundir / "args.txt").unlink()
    proc = site.launch(run_id, "generic", {"program": "/bin/true"})
    assert proc.returncode == 96
    assert proc.stderr == b"remote-exec agent: this run was already launched\n"
    assert not (rundir / "args.txt").exists()
    # nor may a launched run's inputs change
    assert "can no longer change" in site.refused(
        f"rsync --server -logDtpre.iLsfxCIvu --partial . {run_id}/")


def test_launch_optional_parameters_unset(site: Site) -> None:
    run_id = site.new_run()
    proc = site.run(f"launch {run_id} generic", b'{"program": "/bin/x"}')
    assert proc.returncode == 0, proc.stderr
    rundir = site.root / run_id
    assert (rundir / "env.txt").read_text() == "n=2 flag=unset unset=unset\n"
    assert (rundir / "args.txt").read_text() == "\n"


def test_entrypoint_runs_where_it_is_installed(site: Site) -> None:
    """A site program may use files beside it; it runs in place (interpreter [] execs it)."""
    program = site.conf / "bin" / "site-program"
    program.parent.mkdir()
    (program.parent / "helper.txt").write_text("found the helper\n")
    program.write_text('#!/bin/sh\ncat "$(dirname "$0")/helper.txt"\nexit 3\n')
    program.chmod(0o755)
    site.spec["entrypoints"]["site"] = {"path": str(program), "sha256": sha256(program),
                                        "interpreter": [], "parameters": {}}
    site.save()
    run_id = site.new_run()
    proc = site.launch(run_id, "site", {})
    assert proc.returncode == 3, proc.stderr
    log = site.root / run_id / "remote_program_exec.log"
    assert log.read_text() == "found the helper\n"
    record = site.state / run_id / "entrypoint"  # the approved bytes, kept with the run
    assert record.read_bytes() == program.read_bytes()
    assert (record.stat().st_mode & 0o777) == 0o500


def test_digest_mismatch_refused(site: Site) -> None:
    run_id = site.new_run()
    site.generic.write_text(GENERIC + "touch tampered\n")
    err = site.refused(f"launch {run_id} generic", {"program": "/bin/true"})
    assert "entrypoint generic ({}) has sha256 {} but the allowlist pins {}".format(
        site.generic, sha256(site.generic), site.spec["entrypoints"]["generic"]["sha256"]) in err
    assert "re-approve" in err
    assert os.listdir(site.root / run_id) == []
    assert site.ok("status " + run_id)["launched"] is False
    assert site.ok("hello")["entrypoints"]["generic"]["digest_ok"] is False


def test_unknown_entrypoint_refused(site: Site) -> None:
    run_id = site.new_run()
    err = site.refused(f"launch {run_id} /bin/sh", {})
    assert "not in the allowlist (allowed: generic, sleeper)" in err
    err = site.refused(f"launch {run_id} nothere", {})
    assert "allowed: generic, sleeper" in err
    err = site.refused(f"launch {str(uuid.uuid4())} generic", {"program": "/bin/true"})
    assert "create it first" in err


@pytest.mark.parametrize("params, needle", [
    ({"program": "/bin/true\n"}, "newlines"),
    ({"program": "/bin/true", "args": ["ok", "two\nlines"]}, "newlines"),
    ({"program": "/bin/true", "args": ["nul\x00"]}, "newlines"),
    ({"program": "/bin/true", "args": ["a", ""]}, "empty element"),
    ({"program": "/bin/true; SECRETVALUE"}, "does not match the pattern"),
    ({"program": "/bin/../etc/x"}, "'..'"),
    ({"program": "/bin/true", "bogus": "1"}, "has no parameter 'bogus'"),
    ({"args": ["x"]}, "needs parameter 'program'"),
    ({"program": "/bin/true", "n": "11"}, "more than the maximum 10"),
    ({"program": "/bin/true", "n": "0"}, "less than the minimum 1"),
    ({"program": "/bin/true", "n": "three"}, "not a valid int"),
    ({"program": "/bin/true", "n": 3}, "JSON string"),
    ({"program": "/bin/true", "flag": "maybe"}, "not a boolean"),
    ({"program": ["/bin/true"]}, "JSON string"),
    ({"program": "/bin/true", "args": [1]}, "list of strings"),
    (b"[1, 2]", "JSON object"),
    (b"{not json", "JSON object"),
    (b'{"program": "/a", "program": "/b"}', "appears twice"),
])
def test_bad_parameters_refused(site: Site, params: object, needle: str) -> None:
    run_id = site.new_run()
    err = site.refused(f"launch {run_id} generic", params)
    assert needle in err, err
    status = site.ok("status " + run_id)
    assert status["launched"] is False and status["exit_code"] is None
    assert os.listdir(site.root / run_id) == []
    assert "SECRETVALUE" not in site.log.read_text()
    assert "refused: " in site.log_lines()[-2]


def test_bad_parameter_names_the_parameter(site: Site) -> None:
    run_id = site.new_run()
    err = site.refused(f"launch {run_id} generic", {"program": "/bin/true", "bogus": "1"})
    assert "parameters: args, code, flag, n, program" in err
    err = site.refused(f"launch {run_id} generic", {"program": "/bin/true", "n": "99"})
    assert "parameter 'n'" in err


def test_run_log_symlink_is_replaced(site: Site) -> None:
    run_id = site.new_run()
    victim = site.tmp / "victim.txt"
    victim.write_text("keep me\n")
    (site.root / run_id / "remote_program_exec.log").symlink_to(victim)
    proc = site.launch(run_id, "generic", {"program": "/bin/true"})
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == "keep me\n"
    log = site.root / run_id / "remote_program_exec.log"
    assert not log.is_symlink() and b"generic ran" in log.read_bytes()
    # the log command serves only a regular file in the run directory
    log.unlink()
    log.symlink_to(victim)
    assert "symbolic link" in site.refused("log " + run_id)


def test_without_rsync(site: Site) -> None:
    run_id = site.new_run()
    env = dict(site.env(f"rsync --server -logDtpre.iLsfxCIvu --partial . {run_id}/"),
               PATH=str(site.tmp / "empty"))
    proc = subprocess.run(site.argv(), capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr == ("remote-exec agent: refused: rsync is not installed on this host; "
                           "ask the site administrator to install it\n")
    env["SSH_ORIGINAL_COMMAND"] = "hello"
    proc = subprocess.run(site.argv(), capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout)["rsync"] is None


def test_wait_log_follow(site: Site) -> None:
    run_id = site.new_run()
    assert "not launched" in site.refused("wait " + run_id)
    launch = site.launch_background(run_id, "sleeper", {"seconds": "4"})
    follow = site.run(f"log {run_id} --follow")
    assert site.ok("wait " + run_id) == {"exit_code": 0}
    assert follow.returncode == 0
    assert follow.stdout == b"tick 0\ntick 1\ntick 2\ntick 3\ndone\n"
    assert launch.wait(timeout=10) == 0
    # a run whose process group vanished without an exit code is reported lost
    lost = site.new_run()
    state = site.state / lost
    (state / "launched").mkdir()
    (state / "pgid").write_text(f"{launch.pid}\n")  # reaped: no such group any more
    proc = site.run("wait " + lost)
    assert proc.returncode == 3 and json.loads(proc.stdout) == {"exit_code": None,
                                                                "lost": True}
    assert site.ok("list")["runs"][-1]["state"] == "dead"


def test_cancel_running(site: Site) -> None:
    run_id = site.new_run()
    launch = site.launch_background(run_id, "sleeper", {"seconds": "100"})
    site.wait_for(lambda: site.ok("status " + run_id)["alive"] is True)
    assert site.ok("list")["runs"][0]["state"] == "running"
    assert "cancel it first" in site.refused("remove " + run_id)
    started = time.monotonic()
    assert site.ok(f"cancel {run_id} 5") == {"result": "stopped by TERM"}
    assert time.monotonic() - started < 4
    assert launch.wait(timeout=10) == 143
    status = site.ok("status " + run_id)
    assert status["exit_code"] == 143 and status["cancelled"] is True
    assert status["alive"] is False
    assert site.ok("wait " + run_id) == {"exit_code": 143}
    assert site.ok("cancel " + run_id) == {"result": "already finished"}
    assert site.ok("remove " + run_id) == {"removed": True}


def test_cancel_ignoring_term_is_killed(site: Site) -> None:
    stubborn = site.conf / "stubborn.sh"
    stubborn.write_text("trap '' TERM\necho up\nwhile :; do sleep 0.1; done\n")
    site.spec["entrypoints"]["stubborn"] = {"path": str(stubborn), "sha256": sha256(stubborn)}
    site.save()
    run_id = site.new_run()
    launch = site.launch_background(run_id, "stubborn", {})
    site.wait_for(lambda: b"up" in site.run("log " + run_id).stdout)
    assert site.ok(f"cancel {run_id} 0") == {"result": "killed"}
    launch.wait(timeout=10)
    assert site.ok("status " + run_id)["exit_code"] == 137


def test_cancel_before_launch(site: Site) -> None:
    run_id = site.new_run()
    assert site.ok("cancel " + run_id) == {"result": "not started"}
    err = site.refused(f"launch {run_id} generic", {"program": "/bin/true"})
    assert "cancelled" in err
    assert os.listdir(site.root / run_id) == []
    status = site.ok("status " + run_id)
    assert status["exit_code"] == 143 and status["cancelled"] is True
    assert site.ok("wait " + run_id) == {"exit_code": 143}


# ---------------------------------------------------------------------------------------
# Everything that is not the agent
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("command, needle", [
    ("id", ONLY_AGENT),
    ("cat /etc/passwd", ONLY_AGENT),
    ("scp -f /etc/passwd", ONLY_AGENT),
    ("sh -c id", ONLY_AGENT),
    ("/bin/sh", ONLY_AGENT),
    ("hello; id", ONLY_AGENT),
    ("'unbalanced", "cannot be parsed"),
    ("", ONLY_AGENT),
    (None, ONLY_AGENT),
    ("internal-sftp", "SFTP is not available through the remote-exec agent"),
    ("/usr/lib/openssh/sftp-server -l INFO", "SFTP is not available"),
])
def test_other_commands_refused(site: Site, command: str | None, needle: str) -> None:
    before = len(site.log_lines())
    err = site.refused(command)
    assert needle in err
    lines = site.log_lines()
    assert len(lines) == before + 1
    assert " refused: " in lines[-1] and f"command={command!r}" in lines[-1]


def test_refusals_never_traceback(site: Site) -> None:
    site.log.mkdir()  # a log that cannot be written (even by root)
    run_id = site.new_run()  # an unwritable log does not fail the request
    shutil.rmtree(site.state / run_id)
    os.symlink("/nonexistent", site.state / run_id)
    err = site.refused("create " + run_id)
    assert "not made by the remote-exec agent" in err


# ---------------------------------------------------------------------------------------
# rsync
# ---------------------------------------------------------------------------------------

def test_rsync_refusals(site: Site) -> None:
    run_id = site.new_run()
    cases = [
        (f"rsync --server --sender -Llogr . {run_id}/", "-L (--copy-links)"),
        (f"rsync --server --sender -logDtprLe.iLsfxCIvu . {run_id}/", "-L"),
        (f"rsync --server -Klogr . {run_id}/", "-K (--keep-dirlinks)"),
        (f"rsync --server -logDtpre.iLsfxCIvu --partial-dir=x . {run_id}/",
         "--partial-dir is not allowed"),
        (f"rsync --server -r --temp-dir=/tmp . {run_id}/", "--temp-dir"),
        (f"rsync --server -r --files-from=- . {run_id}/", "--files-from"),
        (f"rsync --server -r --copy-unsafe-links . {run_id}/", "--copy-unsafe-links"),
        (f"rsync --server --sender -r --copy-links . {run_id}/", "--copy-links"),
        (f"rsync --server -r --log-file=/tmp/x . {run_id}/", "--log-file"),
        (f"rsync --server -r --timeout=x . {run_id}/", "must be a number"),
        (f"rsync --server -rs . {run_id}/", "-s is not allowed"),
        (f"rsync --server -re.i/x . {run_id}/", "capability"),
        ("rsync --server -r . ../x", "'..'"),
        (f"rsync --server -r . {run_id}/../../etc", "'..'"),
        ("rsync --server -r . /etc/", "absolute"),
        ("rsync --server --sender -r . /etc/passwd", "absolute"),
        ("rsync --server --sender -r . ~/.ssh/", "absolute"),
        ("rsync --server -r . x/", "must start with a run id"),
        (f"rsync --server -r . {uuid.uuid4()}/", "create it first"),
        (f"rsync --server -r . {run_id}/ {run_id}/x", "exactly one path"),
        (f"rsync --server -r {run_id}/", "'.'"),
        ("rsync --server -r .", "no path"),
        ("rsync --daemon", "server side"),
        (f"rsync --server --daemon . {run_id}/", "--daemon"),
        ("rsync -r /etc/passwd x", "server side"),
        (f"rsync --server --sender -r . {run_id}", "trailing slash"),
    ]
    for command, needle in cases:
        err = site.refused(command)
        assert needle in err, (command, err)
    # a symlinked directory inside the run directory is never written through
    (site.root / run_id / "out").symlink_to(site.tmp)
    err = site.refused(f"rsync --server -r . {run_id}/out/")
    assert "symbolic link" in err


def _rsync(site: Site, *args: str) -> subprocess.CompletedProcess:
    helper = site.tmp / "fake_ssh.py"
    if not helper.exists():
        helper.write_text(FAKE_SSH % {"agent": str(AGENT), "allowlist": str(site.allowlist),
                                      "python": site.python})
    rsh = f"{sys.executable} {helper}"
    return subprocess.run(["rsync", "-e", rsh, *args], capture_output=True, text=True,
                          env=site.env(None), timeout=60, cwd=site.tmp)


def test_rsync_stage_and_fetch(site: Site) -> None:
    if not shutil.which("rsync"):
        pytest.skip("rsync is not installed")
    run_id = site.new_run()
    rundir = site.root / run_id
    src = site.tmp / "inputs"
    (src / "sub").mkdir(parents=True)
    (src / "in.txt").write_text("input\n")
    (src / "sub" / "x.dat").write_text("1.5\n")
    (src / "evil").symlink_to("/etc/passwd")
    (src / "up").symlink_to("../../..")

    # stage: the agent is the receiver; symlinks arrive munged
    proc = _rsync(site, "-a", "--partial", str(src) + "/", f"remote:{run_id}/")
    assert proc.returncode == 0, proc.stderr
    assert (rundir / "in.txt").read_text() == "input\n"
    assert (rundir / "sub" / "x.dat").read_text() == "1.5\n"
    for name in ("evil", "up"):
        link = rundir / name
        assert link.is_symlink()
        assert os.readlink(link) != os.readlink(src / name)
        assert not link.exists()  # munged links resolve to nothing
    assert os.path.realpath(rundir / "evil") != "/etc/passwd"
    # the orchestrator's own stage options
    proc = _rsync(site, "-a", "-L", "--partial", str(src / "in.txt"),
                  f"remote:{run_id}/copy/")
    assert proc.returncode == 0, proc.stderr
    assert (rundir / "copy" / "in.txt").read_text() == "input\n"

    proc = site.launch(run_id, "generic", {"program": "/bin/true"})
    assert proc.returncode == 0, proc.stderr
    assert (rundir / "secret.key").exists() and (rundir / "link_out").is_symlink()

    # after launch, inputs can no longer change
    proc = _rsync(site, "-a", str(src) + "/", f"remote:{run_id}/")
    assert proc.returncode != 0
    assert "can no longer change" in proc.stderr

    # fetch: the agent is the sender, serving only the filtered outbox
    out = site.tmp / "fetched"
    proc = _rsync(site, "-a", "--partial", "--safe-links", f"remote:{run_id}/",
                  str(out) + "/")
    assert proc.returncode == 0, proc.stderr
    assert (out / "result.txt").read_text() == "result\n"
    assert (out / "sub" / "deeper" / "model.odb").read_text() == "odb\n"
    assert not (out / "in.txt").exists()  # an input the run left unchanged: the client has it
    assert not (out / "secret.key").exists()
    assert not (out / "secret").exists()
    assert (rundir / "secret.key").exists() and (rundir / "secret" / "inner.txt").exists()
    assert not os.path.lexists(out / "link_out")  # the run's link to /etc/passwd
    assert os.readlink(out / "link_in") == "result.txt"
    assert not os.path.lexists(out / "evil")  # the munged link is absolute: not returned
    # one file by name, and a subdirectory
    proc = _rsync(site, "-a", f"remote:{run_id}/result.txt", str(site.tmp / "one.txt"))
    assert proc.returncode == 0, proc.stderr
    assert (site.tmp / "one.txt").read_text() == "result\n"
    proc = _rsync(site, "-a", f"remote:{run_id}/secret.key", str(site.tmp / "k"))
    assert proc.returncode != 0 and not (site.tmp / "k").exists()
    # fetching with -L (follow links) is refused outright
    proc = _rsync(site, "-a", "-L", f"remote:{run_id}/", str(site.tmp / "f2") + "/")
    assert proc.returncode != 0 and "copy-links" in proc.stderr
    assert f"ok: rsync sender ({run_id}: " in site.log.read_text()


# ---------------------------------------------------------------------------------------
# The return filter
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, path, expected", [
    ("*.odb", "a.odb", True),
    ("*.odb", "d/a.odb", False),
    ("**/*.odb", "a.odb", True),
    ("**/*.odb", "d/e/a.odb", True),
    ("**", "x", True),
    ("**", "x/y/z", True),
    ("secret", "secret/x/y", True),
    ("secret", "secrets/x", False),
    ("secret/**", "secret", True),
    ("secret/**", "secret/a/b", True),
    ("results/", "results/a.txt", True),
    ("a/*/c", "a/b/c", True),
    ("a/*/c", "a/b/d/c", False),
    ("a/**/c", "a/c", True),
    ("a/**/c", "a/b/d/c", True),
    ("a/**/c", "a/b/d/e", False),
    ("*.key", "dir/x.key", False),
    ("**/*.key", "dir/x.key", True),
    ("out?.txt", "out1.txt", True),
    ("out?.txt", "out12.txt", False),
    ("[ab].txt", "b.txt", True),
    ("*", "x/y", True),
    ("*.TXT", "a.txt", False),
])
def test_match_pattern(pattern: str, path: str, expected: bool) -> None:
    assert agent_module.match_pattern(pattern, path) is expected


def test_is_returned() -> None:
    is_returned = agent_module.is_returned
    assert is_returned("a.odb", ["**"], [], [])
    assert not is_returned("a.odb", ["*.csv"], [], [])
    assert not is_returned("x.key", ["**"], ["*.key"], [])
    assert not is_returned("secret/deep/f", ["**"], ["secret/**"], [])
    assert is_returned("r/a.csv", ["**"], [], ["r"])
    assert not is_returned("a.csv", ["**"], [], ["r"])
    assert not is_returned("r/a.key", ["r/**"], ["**/*.key"], ["r"])


def test_build_outbox(tmp_path: Path) -> None:
    rundir = tmp_path / "run"
    outbox = tmp_path / "outbox"
    (rundir / "d" / "e").mkdir(parents=True)
    (rundir / "empty").mkdir()
    (rundir / "secret").mkdir()
    (rundir / "a.csv").write_text("1,2\n")
    (rundir / "d" / "e" / "b.csv").write_text("3,4\n")
    (rundir / "d" / "notes.txt").write_text("n\n")
    (rundir / "x.key").write_text("k\n")
    (rundir / "secret" / "s.csv").write_text("s\n")
    (rundir / "in_link").symlink_to("d/e/b.csv")
    (rundir / "d" / "up_link").symlink_to("../a.csv")
    (rundir / "out_link").symlink_to("/etc/passwd")
    (rundir / "escape").symlink_to("../../..")
    (rundir / "dot").symlink_to(".")
    (rundir / "tricky").symlink_to("dot/dot/..")  # lexically "dot", really the parent
    (rundir / "dir_link").symlink_to("d")
    os.mkfifo(rundir / "fifo")
    outbox.mkdir()
    (outbox / "stale").write_text("old\n")

    report = agent_module.build_outbox(str(rundir), str(outbox), ["**"], ["*.key", "secret"],
                                       [])
    got = sorted(os.path.relpath(os.path.join(d, f), outbox)
                 for d, dirs, files in os.walk(outbox) for f in dirs + files)
    assert got == ["a.csv", "d", "d/e", "d/e/b.csv", "d/notes.txt", "d/up_link", "dir_link",
                   "dot", "empty", "in_link"]
    assert report["files"] == 3
    assert report["bytes"] == 4 + 4 + 2
    assert report["links"] == 4
    assert set(report["skipped"]) == {"x.key", "secret/s.csv", "out_link", "escape",
                                      "tricky", "fifo"}
    assert os.stat(outbox / "a.csv").st_ino == os.stat(rundir / "a.csv").st_ino
    assert os.readlink(outbox / "in_link") == "d/e/b.csv"
    assert not (outbox / "secret").exists()

    report = agent_module.build_outbox(str(rundir), str(outbox), ["**/*.csv"], [], ["d"])
    got = sorted(os.path.relpath(os.path.join(d, f), outbox)
                 for d, dirs, files in os.walk(outbox) for f in dirs + files)
    assert got == ["d", "d/e", "d/e/b.csv"]
    assert report["files"] == 1
