"""A real single-node Slurm cluster on loopback, for tests (stdlib only).

``SlurmCluster(directory).up()`` writes a ``slurm.conf`` into ``directory`` (free ports,
state/spool/pid/log files all inside it, short timers), makes sure ``munged`` runs, starts
``slurmctld`` and ``slurmd`` as root and waits until the node is idle. ``down()`` stops the two
Slurm daemons again. Client commands (``sbatch``, ``squeue``, ``scontrol`` ...) need
``env=cluster.env`` (it carries ``SLURM_CONF``).

Needs root and the Debian packages ``slurm-wlm`` (which pulls in slurmctld, slurmd,
slurm-client and munge). ``SlurmCluster.available()`` says why not, for ``pytest.skip``.

munge: if ``munge -n | unmunge`` already works, the running munged is used. Otherwise the key is
created if missing (``mungekey -c``), ``/run/munge`` is created/owned by munge, and ``munged`` is
started as the munge user and LEFT RUNNING after ``down()``: it is a system daemon (the one a
packaged Slurm would use too), harmless to leave, and other clusters/tests can share it.

Accounting is off (``accounting_storage/none``): ``sacct`` knows nothing about jobs. A finished
job stays visible to ``scontrol show job`` for ``MinJobAge`` (600 s here).

Jobs are tracked by process group (``proctrack/pgid``: a job's leftover children die with it, as
with cgroups on real clusters) and slurmd runs under a tiny subreaper so orphans are reaped even
when PID 1 does not reap (containers). ``down()`` cancels all jobs and kills leftover steps.
Real outputs captured with this cluster, and what they taught: tests/data/slurm/README.md.

REST (``rest=True``): slurmctld also accepts JWTs (``AuthAltTypes=auth/jwt``, a 32-byte HS256 key
``jwt_hs256.key`` in the directory) and ``slurmrestd`` (openapi v0.0.36-38, ``rest_auth/jwt``)
listens on ``cluster.rest_url`` (``http://127.0.0.1:<free port>``). slurmrestd refuses to run as
root, so it is started with ``-u nobody`` (it drops to nobody after binding); it needs the
Debian packages ``slurmrestd slurm-wlm-jwt-plugin`` (``SlurmCluster.rest_available()``). Requests
carry ``X-SLURM-USER-NAME`` and ``X-SLURM-USER-TOKEN`` (``cluster.token(user)``, a JWT from
``scontrol token``); ``cluster.request(method, path, body)`` does that with urllib. SLURM_JWT is
never put into ``cluster.env``: Slurm client commands would then try JWT instead of munge.
As nobody, slurmrestd must be able to read slurm.conf: when a parent directory is closed to
others (pytest's ``/tmp/pytest-of-root`` is 0700), it reads a copy in a 0755 temporary directory
(removed by ``down()``); the real ``slurm.conf`` is made 0644 either way.
Real answers captured with it: tests/data/slurmrest/README.md.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "scancel")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")
REST_USER = "nobody"  # slurmrestd refuses root; it setuid()s to this user after binding
REST_PLUGINS = "openapi/v0.0.36,openapi/v0.0.37,openapi/v0.0.38"  # the dbv* ones need slurmdbd
REST_VERSION = "v0.0.38"
REST_INSTALL = "apt-get install -y slurmrestd slurm-wlm-jwt-plugin"
JWT_PLUGIN_GLOBS = ("/usr/lib/*/slurm-wlm/auth_jwt.so", "/usr/lib/slurm-wlm/auth_jwt.so",
                    "/usr/lib*/slurm/auth_jwt.so", "/usr/local/lib*/slurm/auth_jwt.so")


# Runs slurmd as its child while being a "child subreaper" (prctl PR_SET_CHILD_SUBREAPER), so
# slurmstepd and the orphans of job scripts are re-parented to it and reaped at once, whatever
# PID 1 does (a container's PID 1 may never reap: zombies would keep a process group alive and
# proctrack/pgid would wait for them up to UnkillableStepTimeout). Forwards TERM/INT/HUP.
_REAPER = r"""
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
child = os.fork()
if child == 0:
    os.execv(sys.argv[1], sys.argv[1:])
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda num, frame: os.kill(child, num))
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        sys.exit(0)
    except InterruptedError:
        continue
    if pid == child:
        sys.exit(os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode")
                 else status >> 8)
"""


class SlurmClusterError(RuntimeError):
    """The cluster (or munge) did not come up; the message carries the log tails."""


class _DaemonExited(SlurmClusterError):
    """A daemon died while starting (e.g. its port was taken meanwhile): worth a retry."""


def _which(name: str) -> str | None:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"({path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def _stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        if not _pid_alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _pid_alive(pid):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)


def munge_works() -> bool:
    """``munge -n | unmunge`` succeeds (a munged is running and its key works)."""
    munge, unmunge = _which("munge"), _which("unmunge")
    if not munge or not unmunge:
        return False
    try:
        cred = subprocess.run([munge, "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        check = subprocess.run([unmunge], input=cred.stdout, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return check.returncode == 0 and b"Success" in check.stdout


def ensure_munge(timeout: float = 15.0) -> None:
    """Reuse a working munged, or start one (left running on purpose, see the module docstring)."""
    if munge_works():
        return
    import grp
    import pwd

    try:
        user = pwd.getpwnam("munge")
    except KeyError as exc:
        raise SlurmClusterError("there is no 'munge' user: is the munge package installed?") \
            from exc
    munged = _which("munged")
    if not munged:
        raise SlurmClusterError("munged is not installed (apt-get install -y munge)")
    gid = user.pw_gid
    if not MUNGE_KEY.exists():
        mungekey = _which("mungekey")
        if mungekey:
            subprocess.run([mungekey, "-c", "-k", str(MUNGE_KEY)], check=True,
                           capture_output=True)
        else:  # older munge: a key is any >= 32 random bytes
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(1024))
    os.chown(MUNGE_KEY, user.pw_uid, gid)
    os.chmod(MUNGE_KEY, 0o400)
    with contextlib.suppress(OSError):
        os.chown(MUNGE_KEY.parent, user.pw_uid, gid)
        os.chmod(MUNGE_KEY.parent, 0o700)
    for path, mode in ((MUNGE_RUN, 0o755), (Path("/var/lib/munge"), 0o711),
                       (Path("/var/log/munge"), 0o700)):
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, user.pw_uid, gid)
        os.chmod(path, mode)
    groups = [g.gr_gid for g in grp.getgrall() if "munge" in g.gr_mem]
    log = Path("/var/log/munge/munged.log")
    attempts = [[munged], [munged, "--force"]]  # --force: a stale socket/lock from a dead munged
    errors = []
    for argv in attempts:
        proc = subprocess.run(argv, capture_output=True, text=True, user=user.pw_uid,
                              group=gid, extra_groups=groups, cwd="/", timeout=30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if munge_works():
                return
            time.sleep(0.2)
        errors.append(f"{' '.join(argv)} -> exit {proc.returncode}: {proc.stderr.strip()}")
    raise SlurmClusterError("munged does not work:\n" + "\n".join(errors)
                            + f"\n--- {log} ---\n" + _tail(log))


class SlurmCluster:
    """One slurmctld + one slurmd (node ``node``, partition ``partition``) in ``directory``."""

    partition = "debug"

    def __init__(self, directory: Path, *, cluster_name: str = "retest",
                 proctrack: str = "pgid", rest: bool = False) -> None:
        self.dir = Path(directory)
        self.cluster_name = cluster_name
        # pgid: everything in the batch shell's process group is TERMed/KILLed with the job,
        # also children that outlive the shell (close to what proctrack/cgroup does on real
        # clusters). linuxproc loses children re-parented to init: a child that ignores TERM
        # survives a scancel forever. cgroup needs a writable cgroupfs (not in CI containers).
        self.proctrack = proctrack
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.ctld_port = 0
        self.slurmd_port = 0
        self.rest = rest
        self.rest_port = 0
        self._rest_conf_dir: Path | None = None  # a world-readable copy of slurm.conf, if needed
        self._procs: dict[str, subprocess.Popen] = {}

    # -- files --------------------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands: os.environ plus SLURM_CONF."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def pid_file(self, daemon: str) -> Path:
        return self.dir / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        return self.dir / f"{daemon}.log"

    @property
    def jwt_key(self) -> Path:
        return self.dir / "jwt_hs256.key"

    @property
    def rest_url(self) -> str:
        """``http://127.0.0.1:PORT`` of slurmrestd (``rest=True`` only)."""
        if not self.rest:
            raise SlurmClusterError("this cluster was made without rest=True")
        return f"http://127.0.0.1:{self.rest_port}"

    # -- checks -------------------------------------------------------------------------
    @staticmethod
    def available() -> str | None:
        """None if a cluster can be started here, else the reason (for ``pytest.skip``)."""
        if os.geteuid() != 0:
            return "a test Slurm cluster needs root (slurmd runs jobs as root)"
        missing = [n for n in (*DAEMONS, "munged", "munge", "unmunge", *CLIENTS) if not _which(n)]
        if missing:
            return ("Slurm/munge not installed (missing " + ", ".join(missing)
                    + "): apt-get install -y slurm-wlm munge")
        return None

    @staticmethod
    def rest_available() -> str | None:
        """None if a cluster with ``rest=True`` can be started here, else the reason."""
        reason = SlurmCluster.available()
        if reason:
            return reason
        missing = []
        if not _which("slurmrestd"):
            missing.append("slurmrestd")
        if not any(glob.glob(pattern) for pattern in JWT_PLUGIN_GLOBS):
            missing.append("auth_jwt.so (slurm-wlm-jwt-plugin)")
        import pwd

        try:
            pwd.getpwnam(REST_USER)
        except KeyError:
            missing.append(f"user {REST_USER}")
        if missing:
            return ("Slurm REST not installed (missing " + ", ".join(missing) + "): "
                    + REST_INSTALL)
        return None

    # -- life ---------------------------------------------------------------------------
    def up(self, timeout: float = 60) -> SlurmCluster:
        """Start munge (if needed), slurmctld and slurmd; return when the node is idle.

        Raises SlurmClusterError (with the daemons' log tails) if that takes over ``timeout``.
        Daemons of an earlier run in the same directory are stopped first; ports are fresh."""
        reason = self.rest_available() if self.rest else self.available()
        if reason:
            raise SlurmClusterError(reason)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._kill_leftovers()
        ensure_munge()
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            try:
                self._start_daemons(deadline)
                return self
            except _DaemonExited:
                self.down()
                if attempt == 2 or time.monotonic() > deadline:
                    raise
            except SlurmClusterError:
                self.down()
                raise
        raise AssertionError("unreachable")

    def _start_daemons(self, deadline: float) -> None:
        for sub in ("state", "spool"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)
            (self.dir / sub).mkdir(mode=0o755)
        self.ctld_port, self.slurmd_port, rest_port = _free_ports(3)
        if self.rest:
            self.rest_port = rest_port
            with contextlib.suppress(OSError):
                self.jwt_key.unlink()
            fd = os.open(self.jwt_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
            os.chown(self.jwt_key, 0, 0)  # owner = SlurmUser (root)
        self.conf.write_text(self.conf_text())
        if self.rest:
            self.conf.chmod(0o644)  # slurmrestd reads it as nobody
        self._start("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        self._wait_ctld(deadline)
        self._start("slurmd", [sys.executable, "-c", _REAPER, _which("slurmd"), "-D",
                               "-f", str(self.conf), "-N", self.node])
        self.wait_idle(max(1.0, deadline - time.monotonic()))
        if self.rest:
            self.start_rest(max(1.0, deadline - time.monotonic()))

    def _wait_ctld(self, deadline: float) -> None:
        # slurmd registers with slurmctld: let slurmctld answer first
        while not self._ping_ctld():
            self._check_alive("slurmctld")
            if time.monotonic() > deadline:
                raise SlurmClusterError(self._failure("slurmctld does not answer"))
            time.sleep(0.2)

    # -- slurmctld restart, slurmrestd --------------------------------------------------
    def stop_ctld(self, kill: bool = False) -> None:
        """Stop slurmctld (TERM: it saves its state; ``kill``: KILL, as a crash, so it
        restarts from what it saved last); slurmd and slurmrestd keep running."""
        proc = self._procs.pop("slurmctld", None)
        for pid in dict.fromkeys([self._daemon_pid("slurmctld"), proc and proc.pid]):
            if pid and kill:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if pid:
                _stop_pid(pid)
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.wait(timeout=1)
        with contextlib.suppress(OSError):
            self.pid_file("slurmctld").unlink()

    def start_ctld(self, timeout: float = 30) -> None:
        """Start slurmctld again WITHOUT ``-c``: it recovers its saved state (jobs survive).

        Returns when it answers ``scontrol ping``."""
        if self._daemon_pid("slurmctld") is not None:
            raise SlurmClusterError("slurmctld is already running")
        self._start("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        self._wait_ctld(time.monotonic() + timeout)

    def token(self, user: str = "root", lifespan: int = 1800) -> str:
        """A JWT for ``user`` (``scontrol token``), valid for ``lifespan`` seconds."""
        out = self.run("scontrol", "token", f"username={user}", f"lifespan={lifespan}",
                       check=False, timeout=30)
        for line in out.stdout.splitlines():
            if line.startswith("SLURM_JWT="):
                return line.split("=", 1)[1].strip()
        raise SlurmClusterError(self._failure(
            f"scontrol token username={user} failed (exit {out.returncode}): "
            f"{out.stdout.strip()} {out.stderr.strip()}"))

    def request(self, method: str, path: str, body: object = None, *, user: str = "root",
             token: str | None = None, headers: dict[str, str] | None = None,
             timeout: float = 60) -> tuple[int, str, object]:
        """One request to slurmrestd: ``(status, content type, parsed JSON or text)``.

        ``path`` starts with ``/`` (``/slurm/v0.0.38/ping``); ``body`` is sent as JSON. The
        auth headers carry ``user`` and ``token`` (a fresh ``self.token(user)`` if None);
        ``headers`` are added last (a value of None drops that header)."""
        all_headers = {"X-SLURM-USER-NAME": user,
                       "X-SLURM-USER-TOKEN": token if token is not None else self.token()}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        request = urllib.request.Request(
            self.rest_url + path, data=data, method=method,
            headers={k: v for k, v in all_headers.items() if v is not None})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                status, ctype, raw = answer.status, answer.headers.get("Content-Type", ""), \
                    answer.read()
        except urllib.error.HTTPError as exc:
            status, ctype, raw = exc.code, exc.headers.get("Content-Type", ""), exc.read()
        text = raw.decode(errors="replace")
        try:
            parsed: object = json.loads(text) if text.strip() else text
        except ValueError:
            parsed = text
        return status, ctype or "", parsed

    def start_rest(self, timeout: float = 30) -> None:
        """Start slurmrestd (as nobody) on ``rest_url``; return when ``/ping`` answers 200."""
        if not self.rest:
            raise SlurmClusterError("this cluster was made without rest=True")
        if "slurmrestd" in self._procs and self._procs["slurmrestd"].poll() is None:
            raise SlurmClusterError("slurmrestd is already running")
        if not self.rest_port:
            self.rest_port = _free_ports(1)[0]
        conf = self._rest_conf()
        env = dict(os.environ)
        env.pop("SLURM_CONF", None)
        env["SLURM_JWT"] = "daemon"  # only slurmrestd's environment, never self.env
        self._start("slurmrestd", [_which("slurmrestd"), "-f", str(conf), "-a", "rest_auth/jwt",
                                   "-s", REST_PLUGINS, "-u", REST_USER,
                                   f"127.0.0.1:{self.rest_port}"],
                    env=env, log=self.log_file("slurmrestd"))
        deadline = time.monotonic() + timeout
        token = self.token(lifespan=max(60, int(timeout) + 60))
        last = ""
        while True:
            self._check_alive("slurmrestd")
            try:
                status, _, body = self.request("GET", f"/slurm/{REST_VERSION}/ping", token=token,
                                            timeout=10)
                if status == 200:
                    return
                last = f"HTTP {status}: {body}"
            except OSError as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise SlurmClusterError(self._failure(f"slurmrestd does not answer: {last}"))
            time.sleep(0.2)

    def stop_rest(self) -> None:
        """Stop slurmrestd (TERM, wait, KILL)."""
        proc = self._procs.pop("slurmrestd", None)
        pids = [proc and proc.pid, self._rest_pid()]
        for pid in dict.fromkeys(pids):
            if pid:
                _stop_pid(pid)
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.wait(timeout=1)
        with contextlib.suppress(OSError):
            self.pid_file("slurmrestd").unlink()

    def _rest_conf(self) -> Path:
        """slurm.conf as slurmrestd (nobody) can read it: the real one if every parent directory
        lets others through, else a copy in a world-readable temporary directory."""
        if all(p.stat().st_mode & 0o001 for p in self.conf.resolve().parents):
            return self.conf
        if self._rest_conf_dir is None:
            self._rest_conf_dir = Path(tempfile.mkdtemp(prefix="slurmrestd-"))
            self._rest_conf_dir.chmod(0o755)
        copy = self._rest_conf_dir / "slurm.conf"
        copy.write_text(self.conf.read_text())
        copy.chmod(0o644)
        return copy

    def _rest_pid(self) -> int | None:
        """The slurmrestd of this cluster (pid file written by us) if it is still alive."""
        try:
            pid = int(self.pid_file("slurmrestd").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        cmdline = _cmdline(pid)
        if _pid_alive(pid) and "slurmrestd" in cmdline and f"127.0.0.1:{self.rest_port}" in cmdline:
            return pid
        return None

    def down(self) -> None:
        """Cancel all jobs, stop slurmrestd, slurmd then slurmctld (TERM, wait, KILL); munged is
        left alone.

        Job steps (``slurmstepd``) of this cluster that are still there afterwards are killed
        with their process groups, so no job outlives the cluster."""
        self.stop_rest()
        if self._rest_conf_dir is not None:
            shutil.rmtree(self._rest_conf_dir, ignore_errors=True)
            self._rest_conf_dir = None
        if self._daemon_pid("slurmctld") is not None:
            self.run("scancel", f"--partition={self.partition}", check=False, timeout=15)
            deadline = time.monotonic() + 10
            while self._stepds() and time.monotonic() < deadline:
                time.sleep(0.2)
        for daemon in ("slurmd", "slurmctld"):
            proc = self._procs.pop(daemon, None)
            # the daemon (its pid file), then what we started (slurmd: the reaper around it)
            for pid in dict.fromkeys([self._daemon_pid(daemon), proc and proc.pid]):
                if pid:
                    _stop_pid(pid)
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.wait(timeout=1)
            with contextlib.suppress(OSError):
                self.pid_file(daemon).unlink()
        self._kill_stepds()

    def __enter__(self) -> SlurmCluster:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- node control -------------------------------------------------------------------
    def run(self, *argv: str, check: bool = True, timeout: float = 30,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run a client command (``sinfo``, ``scontrol`` ...) against this cluster.

        ``cwd`` matters for ``sbatch``: a batch job runs in (and writes relative output
        paths into) the directory sbatch was started in."""
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True,
                              check=check, timeout=timeout, cwd=cwd)

    def node_state(self) -> str:
        """The node state as ``sinfo -h -N -o %T`` prints it (``idle``, ``drained`` ...)."""
        out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return out.stdout.strip()

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o ID`` as a dict (``JobState``, ``ExitCode``, ``Requeue``...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(p.partition("=")[::2] for p in out.split() if "=" in p)

    def wait_job_state(self, job_id: str, state: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.job(job_id).get("JobState") != state:
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"job {job_id} is not {state}: {self.job(job_id)}")
            time.sleep(0.3)

    def hold_node(self) -> str:
        """Start a job holding every CPU of the node (so that the next one pends); its id."""
        out = self.run("sbatch", "--parsable", "--exclusive", "-o", "/dev/null",
                       "--wrap", "sleep 120").stdout
        job_id = out.strip().split(";")[0]
        self.wait_job_state(job_id, "RUNNING")
        return job_id

    def drain(self, reason: str = "test drain") -> None:
        self.run("scontrol", "update", f"NodeName={self.node}", "State=DRAIN",
                 f"Reason={reason}")

    def resume(self) -> None:
        self.run("scontrol", "update", f"NodeName={self.node}", "State=RESUME")

    def wait_state(self, states: tuple[str, ...], timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while True:
            state = self.node_state()
            if state in states:
                return state
            for daemon in self._procs:
                self._check_alive(daemon)
            if time.monotonic() > deadline:
                raise SlurmClusterError(self._failure(
                    f"node {self.node} is {state or '(unknown)'!r}, not {'/'.join(states)}, "
                    f"after {timeout:.0f} s"))
            time.sleep(0.2)

    def wait_idle(self, timeout: float = 30) -> None:
        """Until ``sinfo`` says the node is idle (raises with the log tails otherwise)."""
        self.wait_state(("idle",), timeout)

    # -- configuration ------------------------------------------------------------------
    def conf_text(self) -> str:
        d = self.dir
        name = self.node
        # Explicit loopback addresses: nothing depends on /etc/hosts resolving the hostname.
        lines = [
            f"ClusterName={self.cluster_name}",
            f"SlurmctldHost={name}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={self.pid_file('slurmctld')}",
            f"SlurmdPidFile={self.pid_file('slurmd')}",
            f"SlurmctldLogFile={self.log_file('slurmctld')}",
            f"SlurmdLogFile={self.log_file('slurmd')}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"ProctrackType=proctrack/{self.proctrack}",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=bf_interval=1,batch_sched_delay=0,sched_min_interval=0",
            "MinJobAge=600",
            "KillWait=2",
            "OverTimeLimit=0",
            "InactiveLimit=0",
            "MessageTimeout=10",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "Waittime=0",
            *(["AuthAltTypes=auth/jwt", f"AuthAltParameters=jwt_key={self.jwt_key}"]
              if self.rest else []),
            f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={name} CPUs={self.cpus} "
            "RealMemory=2000 State=UNKNOWN",
            f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        return "\n".join(lines) + "\n"

    # -- internals ----------------------------------------------------------------------
    def _start(self, daemon: str, argv: list, env: dict[str, str] | None = None,
               log: Path | None = None) -> None:
        out = open(log or self.dir / f"{daemon}.stdout", "ab" if log else "wb")  # noqa: SIM115
        try:
            proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=self.dir,
                                    start_new_session=True, env=env)
        finally:
            out.close()
        self._procs[daemon] = proc
        if daemon == "slurmrestd":  # it writes no pid file itself
            self.pid_file(daemon).write_text(f"{proc.pid}\n")

    def _check_alive(self, daemon: str) -> None:
        proc = self._procs.get(daemon)
        if proc is not None and proc.poll() is not None:
            raise _DaemonExited(self._failure(f"{daemon} exited with {proc.returncode}"))

    def _ping_ctld(self) -> bool:
        out = self.run("scontrol", "ping", check=False, timeout=15)
        return out.returncode == 0 and "UP" in out.stdout

    def _daemon_pid(self, daemon: str) -> int | None:
        """The pid in ``daemon``'s pid file if that process is alive and runs with our conf."""
        try:
            pid = int(self.pid_file(daemon).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        cmdline = _cmdline(pid)
        if _pid_alive(pid) and daemon in cmdline and str(self.conf) in cmdline:
            return pid
        return None

    def _kill_leftovers(self) -> None:
        """Daemons and job steps of an earlier (crashed) run in THIS directory."""
        for daemon in ("slurmd", "slurmctld"):
            pid = self._daemon_pid(daemon)
            if pid is not None:
                _stop_pid(pid)
            with contextlib.suppress(OSError):
                self.pid_file(daemon).unlink()
        self._kill_stale_rest()
        self._kill_stepds()

    def _kill_stale_rest(self) -> None:
        """A slurmrestd of an earlier run in this directory (its pid file, checked: alive, a
        slurmrestd, cwd = this directory)."""
        try:
            pid = int(self.pid_file("slurmrestd").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        with contextlib.suppress(OSError):
            if ("slurmrestd" in _cmdline(pid) and _pid_alive(pid)
                    and Path(os.readlink(f"/proc/{pid}/cwd")) == self.dir.resolve()):
                _stop_pid(pid)
        with contextlib.suppress(OSError):
            self.pid_file("slurmrestd").unlink()

    def _stepds(self) -> list[int]:
        """Live slurmstepd processes of this cluster: slurmd starts them in its cwd (our dir)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if not entry.joinpath("comm").read_text().startswith("slurmstepd"):
                    continue
                if Path(os.readlink(entry / "cwd")) != self.dir.resolve():
                    continue
            except OSError:
                continue
            if _pid_alive(int(entry.name)):
                found.append(int(entry.name))
        return found

    def _kill_stepds(self) -> None:
        """SIGKILL leftover job steps of this cluster and the process groups of their tasks."""
        for pid in self._stepds():
            groups = set()
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    fields = entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == pid:  # a task forked by this slurmstepd
                    groups.add(int(fields[2]))
            for pgid in groups - {0, 1, os.getpgid(0)}:
                with contextlib.suppress(OSError):
                    os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def _failure(self, what: str) -> str:
        parts = [f"test Slurm cluster in {self.dir}: {what}"]
        for daemon in (*DAEMONS, "slurmrestd"):
            for path in (self.log_file(daemon), self.dir / f"{daemon}.stdout"):
                if path.exists():
                    parts.append(f"--- {path} (tail) ---\n{_tail(path)}")
        return "\n".join(parts)


# -- captured outputs (tests/data/slurm/*.txt) -------------------------------------------
DATA_DIR = Path(__file__).resolve().parent / "data" / "slurm"


class Capture:
    """One captured command run: ``command`` (shell-quoted), ``returncode``, ``stderr``, ``stdout``.

    File format (written by ``tests/data/slurm/capture.py``)::

        command: squeue -h -j 7 -o '%i|%T'
        exit: 0
        --- stderr ---
        <stderr, verbatim>
        --- stdout ---
        <stdout, verbatim, to the end of the file>
    """

    def __init__(self, command: str, returncode: int, stdout: str, stderr: str) -> None:
        self.command = command
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr

    def dumps(self) -> str:
        stderr = self.stderr
        if stderr and not stderr.endswith("\n"):
            stderr += "\n"
        return (f"command: {self.command}\nexit: {self.returncode}\n--- stderr ---\n{stderr}"
                f"--- stdout ---\n{self.stdout}")

    @classmethod
    def loads(cls, text: str) -> Capture:
        head, _, stdout = text.partition("--- stdout ---\n")
        head, _, stderr = head.partition("--- stderr ---\n")
        fields = dict(line.split(": ", 1) for line in head.splitlines() if ": " in line)
        return cls(fields["command"], int(fields["exit"]), stdout, stderr)


def read_capture(name: str) -> Capture:
    """``read_capture("squeue_pending")`` -> the Capture in tests/data/slurm/squeue_pending.txt."""
    return Capture.loads((DATA_DIR / f"{name}.txt").read_text())
