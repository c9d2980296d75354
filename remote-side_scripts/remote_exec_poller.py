#!/usr/bin/env python3
"""remote-exec poller: the site side of the pull method (docs/pull-protocol.md).

A site that accepts no inbound SSH runs this program (standard library only, Python
>= 3.6) beside the restricted agent ``remote_exec_agent.py``. It asks the queue server
(over outbound HTTPS, with a site token) for the runs meant for its site, checks each
against the site's own allowlist with the agent's own code, runs the approved entrypoint
through the agent (detached: it survives the poller) and sends the results back::

    python3 remote_exec_poller.py --config poller.json [--once] [--check]

``--once`` claims at most one job, handles it to the end and exits; ``--check`` prints
the configuration, the allowlist's entrypoints, whether the server answers and whether
it accepts the token, and exits non-zero with what to fix.

The configuration (JSON; relative paths are relative to the file)::

    {"version": 1, "server": "https://mint.example.jp:50443/re-pull/v1",
     "token_file": "token", "ca_file": "mint-ca.pem", "client_cert": null,
     "client_key": null, "proxy": "env", "allowlist": "allowlist.json", "agent": null,
     "slots": 1, "wait": 25, "state": "poller-state", "log": "poller.log",
     "cleanup": "on-success"}

``token_file`` holds the site token (mode 0600, owned by the user running the poller);
the token never appears on a command line or in the log. ``proxy``: ``"env"`` (the
``https_proxy`` / ``no_proxy`` variables), ``null`` (none) or ``http://[user:pass@]host:port``
(HTTP CONNECT). ``agent``: the agent's file (default: ``remote_exec_agent.py`` beside this
one). ``cleanup``: ``on-success`` (remove a run directory after exit code 0),
``always`` or ``never``. ``state`` keeps the poller's id and one file per job under way,
so that a restarted poller picks its jobs up again (the entrypoints keep running).

Environment variables meant for tests only: ``REMOTE_EXEC_POLLER_AUTH_RETRY`` (seconds
between retries while the server refuses the token; default 300) and
``REMOTE_EXEC_POLLER_TEST_DELAY`` (seconds slept after each MiB of input downloaded or
output uploaded, and once before launching; default 0).
"""

import argparse
import base64
import errno
import hashlib
import http.client
import importlib.util
import json
import os
import random
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
import urllib.request
import uuid

POLLER_VERSION = "1"
CONFIG_KEYS = frozenset(["version", "server", "token_file", "ca_file", "client_cert",
                         "client_key", "proxy", "allowlist", "agent", "slots", "wait",
                         "state", "log", "cleanup"])
CLEANUP = ("on-success", "always", "never")
CHUNK = 1024 * 1024
MAX_LOG_POST = 1024 * 1024
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
AUTH_CODES = ("token_expired", "token_revoked", "unauthenticated", "forbidden")
AUTH_LOG_EVERY = 3600.0
REQUEST_TIMEOUT = 60.0
MONITOR_SECONDS = 1.0
EXIT_POLL_SECONDS = 0.2
ALLOWLIST_RETRY = 30.0
MAX_PATH_SEGMENTS = 16
MAX_PATH_BYTES = 4096
PART_PREFIX = ".re-part-"


def _env_float(name, default):
    try:
        return float(os.environ.get(name, ""))
    except ValueError:
        return default


class ConfigError(Exception):
    """A configuration the poller cannot run with (the message says what to fix)."""


class Stopping(Exception):
    """The poller was asked to stop (SIGTERM/SIGINT) or the job is over."""


class LeaseLost(Exception):
    """The server no longer accepts this job's lease (409 lease_lost)."""


class DiskError(Exception):
    """Writing a file on the site failed (``args[0]``: the OSError)."""


class JobGone(Exception):
    """The server does not know the job any more (404), or refuses it for good."""


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK)
            if not block:
                return h.hexdigest()
            h.update(block)


def write_atomic(path, data, mode=0o600):
    tmp = "%s.%d.%d.tmp" % (path, os.getpid(), threading.get_ident())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def check_relpath(path):
    """None if ``path`` follows the protocol's path rule, else why not."""
    if not isinstance(path, str) or not path:
        return "a path must be a non-empty string"
    if "\x00" in path:
        return "NUL bytes are not allowed"
    if path.startswith("/"):
        return "absolute paths are not allowed"
    segs = path.split("/")
    if any(s in ("", ".", "..") for s in segs):
        return "empty, '.' and '..' segments are not allowed"
    if len(segs) > MAX_PATH_SEGMENTS:
        return "more than %d segments" % MAX_PATH_SEGMENTS
    try:
        if len(path.encode("utf-8")) > MAX_PATH_BYTES:
            return "longer than %d bytes" % MAX_PATH_BYTES
    except UnicodeEncodeError:
        return "not valid UTF-8"
    return None


def quote_path(path):
    return urllib.parse.quote(path, safe="/")


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------

class Config:
    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.base = os.path.dirname(self.path)
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("cannot read the configuration %s: %s"
                              % (self.path, getattr(exc, "strerror", None) or exc)) from None
        except ValueError as exc:
            raise ConfigError("the configuration %s is not valid JSON: %s"
                              % (self.path, exc)) from None
        where = "configuration %s" % self.path
        if not isinstance(data, dict):
            raise ConfigError("%s: expected a JSON object" % where)
        unknown = sorted(set(data) - CONFIG_KEYS)
        if unknown:
            raise ConfigError("%s: unknown keys %s (known: %s)"
                              % (where, ", ".join(unknown), ", ".join(sorted(CONFIG_KEYS))))
        if data.get("version", 1) != 1:
            raise ConfigError("%s: version %r is not supported (version 1)"
                              % (where, data.get("version")))
        server = data.get("server")
        if not isinstance(server, str) or not server.startswith("https://"):
            raise ConfigError("%s: 'server' must be the queue server's https:// URL with its "
                              "prefix, e.g. https://mint.example.jp:50443/re-pull/v1" % where)
        url = urllib.parse.urlsplit(server)
        if not url.hostname or url.query or url.fragment or url.username:
            raise ConfigError("%s: 'server' %r is not a plain https://HOST[:PORT]/PREFIX URL"
                              % (where, server))
        self.server = server
        self.host = url.hostname
        try:
            self.port = url.port or 443
        except ValueError:
            raise ConfigError("%s: 'server' has a bad port" % where) from None
        self.prefix = url.path.rstrip("/")
        self.token_file = self._path(data, "token_file", where, required=True)
        self.ca_file = self._path(data, "ca_file", where)
        self.client_cert = self._path(data, "client_cert", where)
        self.client_key = self._path(data, "client_key", where)
        if self.client_key and not self.client_cert:
            raise ConfigError("%s: 'client_key' needs 'client_cert'" % where)
        proxy = data.get("proxy", "env")
        if proxy is not None and proxy != "env":
            if not isinstance(proxy, str) or not proxy.startswith("http://"):
                raise ConfigError("%s: 'proxy' must be \"env\", null or http://[user:pass@]"
                                  "host:port" % where)
            p = urllib.parse.urlsplit(proxy)
            if not p.hostname:
                raise ConfigError("%s: 'proxy' %r names no host" % (where, proxy))
        self.proxy = proxy
        self.allowlist = self._path(data, "allowlist", where, default="allowlist.json")
        self.agent = self._path(data, "agent", where) or os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "remote_exec_agent.py")
        slots = data.get("slots", 1)
        if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= 256:
            raise ConfigError("%s: 'slots' must be a whole number from 1 to 256" % where)
        self.slots = slots
        wait = data.get("wait", 25)
        if isinstance(wait, bool) or not isinstance(wait, int) or not 0 <= wait <= 3600:
            raise ConfigError("%s: 'wait' must be whole seconds (0 to 3600)" % where)
        self.wait = wait
        self.state = self._path(data, "state", where, default="poller-state")
        self.log = self._path(data, "log", where, default="poller.log")
        cleanup = data.get("cleanup", "on-success")
        if cleanup not in CLEANUP:
            raise ConfigError("%s: 'cleanup' must be one of %s" % (where, ", ".join(CLEANUP)))
        self.cleanup = cleanup

    def _path(self, data, key, where, required=False, default=None):
        value = data.get(key, default)
        if value is None:
            if required:
                raise ConfigError("%s: %r is required" % (where, key))
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError("%s: %r must be a path" % (where, key))
        return os.path.abspath(os.path.join(self.base, os.path.expanduser(value)))

    def read_token(self):
        path = self.token_file
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise ConfigError("cannot read the token file %s: %s"
                              % (path, exc.strerror or exc)) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError("the token file %s is not a regular file" % path)
            if st.st_uid != os.getuid():
                raise ConfigError("the token file %s is not owned by this user (uid %d); "
                                  "chown it" % (path, os.getuid()))
            if st.st_mode & 0o077:
                raise ConfigError("the token file %s has mode %04o; others may read it: "
                                  "chmod 600 %s" % (path, stat.S_IMODE(st.st_mode), path))
            data = os.read(fd, 65536)
        finally:
            os.close(fd)
        token = data.decode("utf-8", "replace").strip()
        if not token or any(c.isspace() for c in token):
            raise ConfigError("the token file %s must hold the site token on one line" % path)
        return token


def load_agent(path):
    """The agent module from its file (importing it has no side effects)."""
    if not os.path.isfile(path):
        raise ConfigError("the agent %s does not exist; set 'agent' to remote_exec_agent.py"
                          % path)
    spec = importlib.util.spec_from_file_location("remote_exec_agent_for_poller", path)
    module = importlib.util.module_from_spec(spec)
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = saved
    return module


# --------------------------------------------------------------------------------------
# Log
# --------------------------------------------------------------------------------------

class Log:
    def __init__(self, path):
        self.path = path
        self.lock = threading.RLock()  # also taken by a signal handler

    def __call__(self, text):
        line = "%s %s\n" % (now_iso(), text.replace("\n", " "))
        with self.lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line.encode("utf-8", "replace"))
                finally:
                    os.close(fd)
            except OSError:
                sys.stderr.write(line)


# --------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------

class Response:
    def __init__(self, status, headers, data):
        self.status = status
        self.headers = headers
        self.data = data

    def json(self):
        try:
            value = json.loads(self.data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, AttributeError):
            return {}
        return value if isinstance(value, dict) else {}

    def error_field(self, name):
        """A field of an error answer (the protocol puts ``missing``, ``log_size``... in
        the ``error`` object; found at the top level too)."""
        body = self.json()
        err = body.get("error")
        if isinstance(err, dict) and name in err:
            return err[name]
        return body.get(name)

    def error_code(self):
        err = self.json().get("error")
        return err.get("code") if isinstance(err, dict) else None

    def error_message(self):
        err = self.json().get("error")
        msg = err.get("message") if isinstance(err, dict) else None
        return msg or ("HTTP %d" % self.status)


class SlowReader:
    """A file read in pieces of at most 1 MiB, sleeping after each (tests only)."""

    def __init__(self, f, delay):
        self.f = f
        self.delay = delay

    def read(self, n=-1):
        data = self.f.read(CHUNK if n is None or n < 0 else min(n, CHUNK))
        if data and self.delay:
            self.pos = getattr(self, "pos", 0) + len(data)
            if self.pos >= CHUNK:
                self.pos = 0
                time.sleep(self.delay)
        return data


def tls_hint(exc, cfg):
    """What to check after a failed request, when TLS failed."""
    if not isinstance(exc, ssl.SSLError):
        return ""
    if getattr(exc, "reason", None) == "CERTIFICATE_VERIFY_FAILED":
        return (" (TLS: the server's certificate was not accepted: is ca_file %s the CA that "
                "signed it, and is %s one of its names?)"
                % (cfg.ca_file or "(system CAs)", cfg.host))
    if not cfg.client_cert:
        return (" (TLS: the handshake failed; does the server require a client certificate? "
                "set client_cert and client_key)")
    return (" (TLS: the handshake failed; is client_cert %s signed by a CA the server "
            "trusts, and named after the site?)" % cfg.client_cert)


class Http:
    """Requests to the queue server, one connection each, with the retry rules."""

    def __init__(self, cfg, token, log, stop):
        self.cfg = cfg
        self.token = token
        self.log = log
        self.stop = stop
        self.auth_retry = _env_float("REMOTE_EXEC_POLLER_AUTH_RETRY", 300.0)
        self.auth_logged = {}
        self.auth_lock = threading.Lock()
        self.ctx = ssl.create_default_context(cafile=cfg.ca_file)
        self.ctx.check_hostname = True
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        if cfg.client_cert:
            self.ctx.load_cert_chain(cfg.client_cert, cfg.client_key)
        self.proxy = self._proxy()
        self.active = {}  # thread id -> connection (so that a stop can break a long-poll)
        self.active_lock = threading.RLock()  # also taken by a signal handler

    def _proxy(self):
        proxy = self.cfg.proxy
        if proxy is None:
            return None
        if proxy == "env":
            proxies = urllib.request.getproxies_environment()
            proxy = proxies.get("https")
            if not proxy:
                return None
            try:
                if urllib.request.proxy_bypass_environment(self.cfg.host):
                    return None
            except Exception:  # noqa: S110 - a malformed no_proxy: use the proxy
                pass
            if "://" not in proxy:
                proxy = "http://" + proxy
        p = urllib.parse.urlsplit(proxy)
        auth = None
        if p.username is not None:
            raw = "%s:%s" % (urllib.parse.unquote(p.username),
                             urllib.parse.unquote(p.password or ""))
            auth = "Basic " + base64.b64encode(raw.encode("utf-8")).decode("ascii")
        return (p.hostname, p.port or 8080, auth)

    def connect(self, timeout):
        if self.proxy:
            host, port, auth = self.proxy
            conn = http.client.HTTPSConnection(host, port, context=self.ctx, timeout=timeout)
            conn.set_tunnel(self.cfg.host, self.cfg.port,
                            headers={"Proxy-Authorization": auth} if auth else None)
        else:
            conn = http.client.HTTPSConnection(self.cfg.host, self.cfg.port, context=self.ctx,
                                               timeout=timeout)
        return conn

    def once(self, method, path, body=None, headers=None, timeout=REQUEST_TIMEOUT,
             sink=None, auth=True):
        """One request; the answer (its body read unless ``sink`` took it)."""
        conn = self.connect(timeout)
        me = threading.get_ident()
        with self.active_lock:
            self.active[me] = conn
        try:
            hdrs = {"User-Agent": "remote-exec-poller/%s" % POLLER_VERSION}
            if auth:
                hdrs["Authorization"] = "Bearer " + self.token
            hdrs.update(headers or {})
            if isinstance(body, dict):
                body = json.dumps(body).encode("utf-8")
                hdrs["Content-Type"] = "application/json"
            if isinstance(body, bytes):
                hdrs["Content-Length"] = str(len(body))
            elif body is None and method in ("POST", "PUT"):
                hdrs["Content-Length"] = "0"
            conn.request(method, self.cfg.prefix + path, body=body, headers=hdrs)
            resp = conn.getresponse()
            headers = {k.lower(): v for k, v in resp.getheaders()}
            if sink is not None and resp.status in (200, 206):
                sink(resp, headers)
                data = b""
            else:
                data = resp.read()
            return Response(resp.status, headers, data)
        finally:
            with self.active_lock:
                self.active.pop(me, None)
            conn.close()

    def break_connections(self, thread_ids=None):
        with self.active_lock:
            conns = [c for t, c in self.active.items() if thread_ids is None or t in thread_ids]
        for conn in conns:
            sock = getattr(conn, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _sleep(self, seconds, abort):
        end = time.monotonic() + seconds
        while True:
            if self.stop.is_set() or (abort is not None and abort.is_set()):
                raise Stopping()
            left = end - time.monotonic()
            if left <= 0:
                return
            self.stop.wait(min(left, 0.5))

    def reload_token(self):
        """Read the token file again (the administrator may have put a new token in)."""
        try:
            token = self.cfg.read_token()
        except ConfigError as exc:
            self.log("the token file cannot be used: %s" % exc)
            return
        with self.auth_lock:
            if token != self.token:
                self.token = token
                self.auth_logged.clear()
                self.log("the token file %s holds a new token: using it" % self.cfg.token_file)

    def _auth_problem(self, resp, what):
        code = resp.error_code() or "HTTP %d" % resp.status
        with self.auth_lock:
            last = self.auth_logged.get(code)
            now = time.monotonic()
            if last is None or now - last >= AUTH_LOG_EVERY:
                self.auth_logged[code] = now
                self.log("the server refused the site token (%s, on %s): %s; fix the token "
                         "file %s (ask the queue server's operators for a new site token); "
                         "retrying every %gs"
                         % (code, what, resp.error_message(), self.cfg.token_file,
                            self.auth_retry))

    def call(self, method, path, body=None, headers=None, timeout=REQUEST_TIMEOUT,
             sink=None, abort=None, what=None):
        """A request retried until it gets an answer that is not a temporary failure.

        Connection errors, 5xx, 429 and 503 are retried with a backoff of 1 s doubling
        to 60 s (with jitter; Retry-After honoured); 401/403 every AUTH_RETRY seconds.
        ``body`` may be a callable giving a fresh body per attempt, ``headers`` too.
        Raises Stopping when the poller stops or ``abort`` is set while it waits.
        """
        what = what or "%s %s" % (method, path)
        delay = BACKOFF_FIRST
        failures = 0
        while True:
            if self.stop.is_set() or (abort is not None and abort.is_set()):
                raise Stopping()
            try:
                resp = self.once(method, path, body() if callable(body) else body,
                                 headers() if callable(headers) else headers, timeout, sink)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                if self.stop.is_set() or (abort is not None and abort.is_set()):
                    raise Stopping() from None
                failures += 1
                if failures in (1, 5) or failures % 20 == 0:
                    hint = tls_hint(exc, self.cfg)
                    self.log("%s failed (%s: %s)%s; retrying (attempt %d)"
                             % (what, type(exc).__name__, exc, hint, failures))
                wait = delay
                delay = min(BACKOFF_MAX, delay * 2)
                self._sleep(wait * random.uniform(0.75, 1.25), abort)  # noqa: S311 - jitter
                continue
            if resp.status in (401, 403):
                self._auth_problem(resp, what)
                self._sleep(self.auth_retry, abort)
                self.reload_token()
                delay = BACKOFF_FIRST
                continue
            if resp.status >= 500 or resp.status == 429:
                failures += 1
                retry_after = None
                try:
                    retry_after = float(resp.headers.get("retry-after", ""))
                except ValueError:
                    pass
                if failures in (1, 5) or failures % 20 == 0:
                    self.log("%s: the server answered %d %s; retrying"
                             % (what, resp.status, resp.error_message()))
                wait = delay * random.uniform(0.75, 1.25)  # noqa: S311 - jitter
                delay = min(BACKOFF_MAX, delay * 2)
                if retry_after is not None and retry_after >= 0:
                    wait = retry_after
                self._sleep(wait, abort)
                continue
            return resp


# --------------------------------------------------------------------------------------
# One job
# --------------------------------------------------------------------------------------

class Job:
    """One claimed job, from its check to its finish (or its recovery after a restart)."""

    def __init__(self, poller, job, record=None):
        self.p = poller
        self.http = poller.http
        self.log = poller.log
        self.job = job
        self.id = job["id"]
        self.lease = job["lease"]["id"]
        self.heartbeat = float(job["lease"].get("heartbeat") or 30)
        self.record = record or {"job": job, "phase": "claimed", "staged": [],
                                 "log_offset": 0, "claimed_at": now_iso()}
        self.done = threading.Event()
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self.launch_proc = None
        self.cfg = None
        self.run = None
        self.beat_thread = None

    # -- plumbing ------------------------------------------------------------------------

    def say(self, text):
        self.log("run %s: %s" % (self.id, text))

    @property
    def state_path(self):
        return os.path.join(self.p.cfg.state, self.id + ".json")

    def save(self, **changes):
        self.record.update(changes)
        write_atomic(self.state_path, json.dumps(self.record, indent=1).encode("utf-8"))

    def drop_state(self):
        try:
            os.unlink(self.state_path)
        except FileNotFoundError:
            pass

    def site_path(self, tail):
        return "/site/jobs/%s/%s" % (quote_path(self.id), tail)

    def lease_header(self):
        return {"X-RE-Lease": self.lease}

    def answer_problem(self, resp, what):
        """Raise for an answer that ends this job's dealings with the server."""
        code = resp.error_code()
        if resp.status == 409 and code == "lease_lost":
            raise LeaseLost(resp.error_message())
        if resp.status == 404:
            raise JobGone("%s: the server does not know this run any more (%s)"
                          % (what, resp.error_message()))
        raise JobGone("%s: the server answered %d %s: %s"
                      % (what, resp.status, code, resp.error_message()))

    def events(self, state=None, pid=None, message=None, abort=None):
        body = {"lease": self.lease}
        if state is not None:
            body["state"] = state
        if pid is not None:
            body["pid"] = pid
        if message:
            body["message"] = message
        resp = self.http.call("POST", self.site_path("events"), body=body, abort=abort,
                              what="run %s: events %s" % (self.id, state or "(heartbeat)"))
        if resp.status == 200:
            ans = resp.json()
            if ans.get("cancel"):
                self.cancel.set()
            return ans
        if resp.status == 409 and resp.error_code() == "state":
            self.say("the server refused the move to %s: %s" % (state, resp.error_message()))
            return resp.json()
        self.answer_problem(resp, "events %s" % (state or "(heartbeat)"))

    def beat(self):
        """The heartbeat, every ``lease.heartbeat`` seconds until the job is done."""
        while not self.done.wait(self.heartbeat):
            if self.p.stop.is_set():
                return
            try:
                self.events(abort=self.done)
            except Stopping:
                return
            except LeaseLost as exc:
                self.say("lease lost: %s" % exc)
                self.lost.set()
                return
            except JobGone as exc:
                self.say(str(exc))
                self.lost.set()
                return
            except Exception as exc:  # the heartbeat must not die silently
                self.say("heartbeat failed: %s: %s" % (type(exc).__name__, exc))

    def start_beat(self):
        if self.beat_thread is None:
            self.beat_thread = threading.Thread(target=self.beat, name="beat-" + self.id[:8])
            self.beat_thread.daemon = True
            self.beat_thread.start()

    def agent(self, command, stdin=b""):
        """Run the agent as sshd would: (exit status, stdout, stderr)."""
        env = dict(os.environ)
        env["SSH_ORIGINAL_COMMAND"] = command
        for name in ("SSH_CONNECTION", "SSH_AUTH_SOCK"):
            env.pop(name, None)
        proc = subprocess.Popen([sys.executable, self.p.cfg.agent, "--allowlist",
                                 self.p.cfg.allowlist], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                close_fds=True, start_new_session=True)
        out, err = proc.communicate(stdin)
        return (proc.returncode, out.decode("utf-8", "replace"),
                err.decode("utf-8", "replace").strip())

    def load_allowlist(self):
        agent = self.p.agent
        cfg = agent.Config(self.p.cfg.allowlist)
        cfg.load()
        self.cfg = cfg
        self.run = agent.Run(cfg, self.id)
        return cfg

    def finish(self, outcome, abort=None, **fields):
        body = {"lease": self.lease, "outcome": outcome, "outputs": [], "held_back": []}
        body.update({k: v for k, v in fields.items() if v is not None})
        if "message" in body and not body["message"]:
            del body["message"]
        resp = self.http.call("POST", self.site_path("finish"), body=body, abort=abort,
                              what="run %s: finish" % self.id)
        if resp.status == 200:
            if os.path.exists(self.state_path):
                self.save(phase="finished", outcome=outcome)
            return resp
        if resp.status == 409 and resp.error_code() == "outputs_missing":
            return resp
        self.answer_problem(resp, "finish")

    def remove_run(self):
        code, out, err = self.agent("remove %s" % self.id)
        if code != 0:
            self.say("could not remove the run directory: %s" % (err or out).strip())

    # -- the job's course ----------------------------------------------------------------

    def main(self, recovering=False):
        retry = 5.0
        try:
            while True:
                try:
                    if recovering:
                        self.recover()
                    else:
                        self.fresh()
                    return
                except Stopping:
                    self.say("left as it is (the poller stops); a restarted poller picks it up")
                    return
                except LeaseLost as exc:
                    self.abandon("lease lost: %s" % exc)
                    return
                except JobGone as exc:
                    self.say("%s; dropped" % exc)
                    if not self.launched():
                        self.remove_run()
                    self.drop_state()
                    return
                except Exception as exc:
                    self.say("error: %s: %s" % (type(exc).__name__, exc))
                    for line in traceback.format_exc().rstrip().split("\n"):
                        self.log("    | " + line)
                if self.done.is_set() or not os.path.exists(self.state_path):
                    return
                # the job is recorded: take it up again from its state file, later
                self.say("trying again in %ds" % retry)
                if self.p.stop.wait(retry):
                    return
                retry = min(300.0, retry * 2)
                recovering = True
                try:
                    with open(self.state_path, "rb") as f:
                        self.record = json.loads(f.read().decode("utf-8"))
                except (OSError, ValueError):
                    return
        finally:
            self.done.set()
            if self.launch_proc is not None:
                self.reap(block=False)

    def launched(self):
        return self.run is not None and self.run.launched()

    def abandon(self, why):
        if self.launched():
            self.say("%s, but the entrypoint was launched: kept" % why)
            return
        self.say("%s before launch: abandoned (run directory removed)" % why)
        self.remove_run()
        self.drop_state()

    def check(self):
        """(reason, message, logged) refusing the job by the site's allowlist, or None
        (``logged``: the message without parameter values, for the poller log)."""
        agent = self.p.agent
        job = self.job
        try:
            entrypoint, _ = agent.approved_entrypoint(self.cfg, job.get("entrypoint") or "")
            entrypoint.bind(job.get("params") or {})
        except agent.Refused as exc:
            return (exc.kind or "bad_parameter", str(exc), exc.logged)
        except agent.Failure as exc:
            return ("digest_mismatch", str(exc), str(exc))
        for item in job.get("inputs") or []:
            why = check_relpath(item.get("path"))
            if not why and item["path"] == agent.LOG_NAME:
                why = "the run log has this name"
            if why:
                message = "input %r: %s" % (item.get("path"), why)
                return ("bad_parameter", message, message)
        return None

    def fresh(self):
        self.say("claimed (entrypoint %s, attempt %s, %d inputs)"
                 % (self.job.get("entrypoint"), self.job.get("attempt"),
                    len(self.job.get("inputs") or [])))
        self.load_allowlist()
        refusal = self.check()
        if refusal is not None:
            reason, message, logged = refusal
            self.say("rejected (%s): %s" % (reason, logged))
            self.finish("rejected", reason=reason, message=message)
            return
        # the state file first: a poller killed right after the create finds its run
        self.save(phase="staging")
        code, out, err = self.agent("create %s" % self.id)
        if code != 0:
            self.say("the agent could not create the run directory: %s" % err)
            self.finish("failed_to_start", reason="launch_failed", message=err or out)
            self.drop_state()
            return
        self.start_beat()
        self.events("staging")
        self.stage()

    def stage(self):
        for item in self.job.get("inputs") or []:
            if self.check_cancel_before_launch():
                return
            try:
                if item["path"] in self.record["staged"] and self.input_present(item):
                    continue
                self.input_target(item["path"])
            except (ValueError, OSError) as exc:
                message = str(exc) if isinstance(exc, ValueError) else (
                    "input %r cannot be placed: %s" % (item["path"], exc))
                self.say("rejected (bad_parameter): %s" % message)
                self.done.set()
                self.finish("rejected", reason="bad_parameter", message=message)
                self.remove_run()
                self.drop_state()
                return
            try:
                ok = self.download(item)
            except (OSError, DiskError) as exc:
                if isinstance(exc, DiskError):
                    exc = exc.args[0]
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                message = ("no space left for input %r in the site's run root %s: %s"
                           % (item["path"], self.cfg.root, exc.strerror or exc))
                self.say("failed to start (no_space): %s" % message)
                self.done.set()
                self.finish("failed_to_start", reason="no_space", message=message)
                self.remove_run()
                self.drop_state()
                return
            if ok is None:
                return
            self.record["staged"].append(item["path"])
            self.save()
        self.save(phase="staged")
        self.events("staged")
        self.launch()

    def check_cancel_before_launch(self):
        if self.lost.is_set():
            raise LeaseLost("the heartbeat lost the lease")
        if not self.cancel.is_set():
            return False
        self.say("cancelled before launch: nothing launched")
        self.done.set()
        self.finish("cancelled", message="cancelled before the entrypoint was launched")
        self.remove_run()
        self.drop_state()
        return True

    def input_target(self, relpath):
        """(directory, final path, part path) for an input, parents made 0700."""
        cur = self.run.dir
        segs = relpath.split("/")
        for seg in segs[:-1]:
            cur = os.path.join(cur, seg)
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                os.mkdir(cur, 0o700)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise ValueError("input %r: %s is a symbolic link or not a directory"
                                 % (relpath, cur))
        final = os.path.join(cur, segs[-1])
        part = os.path.join(cur, PART_PREFIX + hashlib.sha256(
            relpath.encode("utf-8")).hexdigest()[:24])
        return final, part

    def input_present(self, item):
        final, _ = self.input_target(item["path"])
        try:
            st = os.lstat(final)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == item.get("size")

    def download(self, item):
        """Fetch one input (Range-resumed), check its sha256, rename it into place.
        None when the job ended meanwhile (a digest mismatch was reported)."""
        relpath = item["path"]
        final, part = self.input_target(relpath)
        size = item.get("size")
        delay = _env_float("REMOTE_EXEC_POLLER_TEST_DELAY", 0.0)
        state = {}

        def headers():
            try:
                have = os.lstat(part).st_size
            except FileNotFoundError:
                have = 0
            state["have"] = have
            hdrs = self.lease_header()
            if 0 < have and (size is None or have < size):
                hdrs["Range"] = "bytes=%d-" % have
            return hdrs

        def sink(resp, hdrs):
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
            h = hashlib.sha256()
            if resp.status == 206 and state["have"] > 0:
                self.say("resuming input %r at byte %d" % (relpath, state["have"]))
                with open(part, "rb") as f:
                    while True:
                        block = f.read(CHUNK)
                        if not block:
                            break
                        h.update(block)
                flags |= os.O_APPEND
            else:
                flags |= os.O_TRUNC
            fd = os.open(part, flags, 0o600)
            try:
                while True:
                    if self.cancel.is_set() or self.lost.is_set() or self.p.stop.is_set():
                        raise Stopping()
                    block = resp.read(CHUNK)
                    if not block:
                        break
                    view = memoryview(block)
                    try:
                        while view:
                            view = view[os.write(fd, view):]
                    except OSError as exc:  # not the connection's fault: not retried
                        raise DiskError(exc) from None
                    h.update(block)
                    if delay:
                        time.sleep(delay)
            finally:
                os.close(fd)
            state["sha256"] = h.hexdigest()

        try:
            resp = self.http.call("GET", self.site_path("inputs/" + quote_path(relpath)),
                                  headers=headers, sink=sink, abort=self.done,
                                  what="run %s: input %r" % (self.id, relpath))
        except Stopping:
            if self.p.stop.is_set():
                raise
            if self.lost.is_set():
                raise LeaseLost("the heartbeat lost the lease") from None
            if self.check_cancel_before_launch():
                return None
            raise
        if resp.status == 416:
            os.unlink(part)
            return self.download(item)
        if resp.status not in (200, 206):
            self.answer_problem(resp, "input %r" % relpath)
        digest = state.get("sha256")
        if digest != item.get("sha256"):
            try:
                os.unlink(part)
            except FileNotFoundError:
                pass
            message = ("input %r has sha256 %s but the job names %s"
                       % (relpath, digest, item.get("sha256")))
            self.say("rejected (input_digest_mismatch): %s" % message)
            self.done.set()
            self.finish("rejected", reason="input_digest_mismatch", message=message)
            self.remove_run()
            self.drop_state()
            return None
        mode = item.get("mode")
        os.chmod(part, (mode if isinstance(mode, int) else 0o644) & 0o777)
        os.rename(part, final)
        return True

    def launch(self):
        if self.check_cancel_before_launch():
            return
        delay = _env_float("REMOTE_EXEC_POLLER_TEST_DELAY", 0.0)
        if delay:
            time.sleep(delay)
        if self.p.stop.is_set():
            raise Stopping()
        self.save(phase="launching")
        self.events("launching")
        if self.lost.is_set():
            raise LeaseLost("the heartbeat lost the lease")
        if self.cancel.is_set():  # the answer to "launching" carried the cancel
            self.check_cancel_before_launch()
            return
        name = self.job["entrypoint"]
        params = json.dumps(self.job.get("params") or {}).encode("utf-8")
        env = dict(os.environ)
        env["SSH_ORIGINAL_COMMAND"] = "launch %s %s" % (self.id, name)
        for var in ("SSH_CONNECTION", "SSH_AUTH_SOCK"):
            env.pop(var, None)
        proc = subprocess.Popen([sys.executable, self.p.cfg.agent, "--allowlist",
                                 self.p.cfg.allowlist], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                close_fds=True, start_new_session=True)
        try:
            proc.stdin.write(params)
            proc.stdin.close()
        except OSError:
            pass
        line = proc.stdout.readline().decode("utf-8", "replace").strip()
        if line.startswith("started "):
            self.launch_proc = proc
            pgid = int(line.split()[1])
            self.say("launched %s (process group %d)" % (name, pgid))
            self.save(phase="running", pgid=pgid)
            self.events("running", pid=pgid)
            self.monitor()
            return
        err = proc.stderr.read().decode("utf-8", "replace").strip()
        code = proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        if code == self.p.agent.EXIT_ALREADY_LAUNCHED or self.run.launched():
            self.say("the run was launched before; watching it")
            self.save(phase="running")
            self.monitor()
            return
        prefix = self.p.agent.SAY_PREFIX + "refused: "
        if code == self.p.agent.EXIT_REFUSED and err.startswith(prefix):
            message = err[len(prefix):]
            reason = "bad_parameter"
            if "sha256" in message and "re-approve" in message:
                reason = "digest_mismatch"
            elif "is not in the allowlist" in message:
                reason = "entrypoint_not_allowed"
            self.say("the agent refused the launch (%s): %s" % (reason, message))
            self.done.set()
            self.finish("rejected", reason=reason, message=message)
        else:
            self.say("the launch failed (exit %s): %s" % (code, err))
            self.done.set()
            self.finish("failed_to_start", reason="launch_failed", message=err or
                        "the agent's launch exited %s" % code)
        self.remove_run()
        self.drop_state()

    def reap(self, block):
        proc = self.launch_proc
        if proc is None:
            return
        if block:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                return
        elif proc.poll() is None:
            return
        for stream in (proc.stdout, proc.stderr):
            try:
                stream.close()
            except (OSError, AttributeError):
                pass
        self.launch_proc = None

    def send_log(self, final=False):
        """Send the run log's bytes from the recorded offset (≤ 1 MiB per call)."""
        path = os.path.join(self.run.dir, self.p.agent.LOG_NAME)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return
            for _ in range(1000):
                offset = self.record.get("log_offset", 0)
                os.lseek(fd, offset, os.SEEK_SET)
                data = os.read(fd, MAX_LOG_POST)
                if not data:
                    return
                resp = self.http.call("POST", self.site_path("log?offset=%d" % offset),
                                      body=data,
                                      headers=dict(self.lease_header(),
                                                   **{"Content-Type":
                                                      "application/octet-stream"}),
                                      what="run %s: log" % self.id)
                ans = resp.json()
                if resp.status == 200:
                    size = ans.get("log_size")
                    new = offset + len(data)
                    if isinstance(size, int) and size > new:
                        new = size
                    self.record["log_offset"] = new
                elif resp.status == 409 and isinstance(resp.error_field("log_size"), int):
                    self.record["log_offset"] = resp.error_field("log_size")
                else:
                    self.answer_problem(resp, "log")
                if len(data) < MAX_LOG_POST and not final:
                    return
        finally:
            os.close(fd)

    def monitor(self):
        """Wait for the entrypoint's exit, sending its log; act on a cancel."""
        self.start_beat()
        gone_since = None
        saved_offset = None
        last_look = 0.0
        while True:
            if self.p.stop.is_set():
                raise Stopping()
            code = self.run.exit_code()
            if code is not None:
                self.reap(block=True)
                self.upload(code)
                return
            if self.cancel.is_set():
                self.do_cancel()
                return
            if time.monotonic() - last_look >= MONITOR_SECONDS:
                last_look = time.monotonic()
                self.reap(block=False)
                self.send_log()
                if self.record.get("log_offset") != saved_offset:
                    saved_offset = self.record.get("log_offset")
                    self.save()
                if self.run.running():
                    gone_since = None
                elif gone_since is None:
                    gone_since = time.monotonic()
                elif time.monotonic() - gone_since > 2.0 and self.run.exit_code() is None:
                    self.say("the entrypoint's process is gone without an exit code")
                    self.send_log(final=True)
                    self.done.set()
                    self.finish("lost", reason="process_lost",
                                message="the entrypoint's process group on the site ended "
                                        "without recording an exit code")
                    self.drop_state()
                    return
            self.p.stop.wait(EXIT_POLL_SECONDS)

    def do_cancel(self):
        grace = self.job.get("cancel_grace", 10)
        if isinstance(grace, bool) or not isinstance(grace, int) or grace < 0:
            grace = 10
        self.say("cancel requested: stopping the entrypoint (grace %ds)" % grace)
        code, out, err = self.agent("cancel %s %d" % (self.id, grace))
        result = out.strip()
        try:
            result = json.loads(out).get("result", result)
        except ValueError:
            pass
        self.say("cancel: %s%s" % (result, (" (%s)" % err) if err else ""))
        self.reap(block=True)
        self.send_log(final=True)
        self.done.set()
        self.finish("cancelled", exit_code=self.run.exit_code(),
                    message="cancelled on request: %s" % result)
        self.cleanup(success=False)

    def upload(self, code):
        """Send the files the return filters let out, the rest of the log, the finish."""
        agent = self.p.agent
        if self.record.get("phase") != "uploading":
            self.save(phase="uploading", exit_code=code)
        self.events("uploading")
        lock = agent._fetch_lock(self.run)
        try:
            outbox, report = agent.build_run_outbox(self.cfg, self.run)
            asked = list(self.job.get("returns") or []) or list(agent.RETURN_ALL)
            files = []
            unsent = []
            for top, dirs, names in os.walk(outbox):
                dirs.sort()
                for name in sorted(names):
                    full = os.path.join(top, name)
                    rel = os.path.relpath(full, outbox).replace(os.sep, "/")
                    if not agent.is_returned(rel, asked, [], []):
                        continue
                    st = os.lstat(full)
                    if not stat.S_ISREG(st.st_mode):
                        unsent.append(rel)
                        continue
                    if check_relpath(rel):
                        unsent.append(rel)
                        continue
                    files.append((rel, full))
            held_back = [rel for rel in report["skipped"]
                         if agent.is_returned(rel, asked, [], []) and not check_relpath(rel)]
            # an input the entrypoint left as it came is not sent back (MInt has it): the
            # agent's outbox leaves out those it saw unchanged since launch, and the
            # digest check below catches the rest (a run launched by an older agent)
            inputs = dict((i.get("path"), i.get("sha256")) for i in self.job.get("inputs") or [])
            outputs = []
            unchanged = report.get("unchanged", 0)
            for rel, full in files:
                digest = sha256_file(full)
                if inputs.get(rel) == digest:
                    unchanged += 1
                    continue
                sent = self.put_output(rel, full, digest)
                if sent is None:
                    unsent.append(rel)
                else:
                    outputs.append(sent)
            self.send_log(final=True)
            message = None
            if unsent:
                message = "not sent: %s" % ", ".join(sorted(unsent)[:20])
                self.say(message)
            self.save(phase="finishing")
            for _ in range(3):
                resp = self.finish("exited", exit_code=code, outputs=outputs,
                                   held_back=sorted(held_back), message=message)
                if resp.status == 200:
                    break
                missing = resp.error_field("missing") or []
                self.say("the server misses outputs %s; sending them again" % missing)
                for rel, full in files:
                    if rel in missing:
                        self.put_output(rel, full)
            else:
                self.say("the server kept refusing the finish: %s" % resp.error_message())
        finally:
            os.close(lock)
        self.say("finished: exit code %d, %d outputs, %d held back, %d unchanged inputs "
                 "not sent" % (code, len(outputs), len(held_back), unchanged))
        self.done.set()
        self.cleanup(success=(code == 0))

    def put_output(self, rel, full, digest=None):
        size = os.lstat(full).st_size
        digest = digest or sha256_file(full)
        files = []

        delay = _env_float("REMOTE_EXEC_POLLER_TEST_DELAY", 0.0)

        def body():
            for f in files:
                f.close()
            f = open(full, "rb")
            files.append(f)
            return SlowReader(f, delay) if delay else f

        headers = dict(self.lease_header())
        headers.update({"Content-Length": str(size), "X-RE-SHA256": digest,
                        "Content-Type": "application/octet-stream"})
        try:
            resp = self.http.call("PUT", self.site_path("outputs/" + quote_path(rel)),
                                  body=body, headers=headers,
                                  what="run %s: output %r" % (self.id, rel))
        finally:
            for f in files:
                f.close()
        if resp.status in (200, 201):
            return {"path": rel, "size": size, "sha256": digest}
        if resp.status == 409 and resp.error_code() == "lease_lost":
            self.answer_problem(resp, "output %r" % rel)
        # 413, 507, 422, or a path the server cannot take (400, 404): this file is not
        # sent; the finish says so (and a run the server lost answers the finish 404)
        self.say("output %r not accepted: %d %s" % (rel, resp.status, resp.error_message()))
        return None

    def cleanup(self, success):
        policy = self.p.cfg.cleanup
        if policy == "always" or (policy == "on-success" and success):
            self.remove_run()
        self.drop_state()

    def recover(self):
        phase = self.record.get("phase")
        self.say("picked up again after a restart (phase %s)" % phase)
        self.load_allowlist()
        if phase == "finished":
            self.done.set()
            self.cleanup(success=(self.record.get("outcome") == "exited"
                                  and self.record.get("exit_code") == 0))
            return
        code, out, err = self.agent("status %s" % self.id)
        try:
            status = json.loads(out)
        except ValueError:
            self.say("the agent's status failed: %s" % err)
            return
        if not status.get("exists"):
            if phase in ("claimed", "staging", "staged", "launching"):
                self.abandon("the run directory is gone")
                return
            self.done.set()
            self.finish("lost", reason="process_lost",
                        message="the run directory on the site is gone")
            self.drop_state()
            return
        if status.get("launched"):
            if status.get("exit_code") is not None:
                self.start_beat()
                self.upload(status["exit_code"])
                return
            if status.get("alive") or self.run.running():
                self.say("the entrypoint still runs (process group %s): watching it"
                         % status.get("pgid"))
                self.events("running", pid=status.get("pgid"))
                self.monitor()
                return
            time.sleep(1.0)
            if self.run.exit_code() is not None:
                self.start_beat()
                self.upload(self.run.exit_code())
                return
            self.say("launched, but its process is gone without an exit code")
            self.done.set()
            self.finish("lost", reason="process_lost",
                        message="the poller restarted and found the entrypoint's process "
                                "gone without an exit code")
            self.drop_state()
            return
        # not launched: go on only if the server still accepts the lease
        self.events()
        self.start_beat()
        if phase == "launching":
            self.launch()
        else:
            self.stage()


# --------------------------------------------------------------------------------------
# The poller
# --------------------------------------------------------------------------------------

class Poller:
    def __init__(self, cfg, log):
        self.cfg = cfg
        self.log = log
        self.stop = threading.Event()
        self.agent = load_agent(cfg.agent)
        self.http = Http(cfg, cfg.read_token(), log, self.stop)
        self.slots = threading.Semaphore(cfg.slots)
        self.jobs = {}  # run id -> thread
        self.jobs_lock = threading.Lock()
        self.claim_thread = None
        self.allowlist_problem = None
        os.makedirs(cfg.state, 0o700, exist_ok=True)
        self.id = self._poller_id()
        self.host = socket.gethostname()

    def _poller_id(self):
        path = os.path.join(self.cfg.state, "poller-id")
        try:
            with open(path) as f:
                text = f.read().strip()
            return str(uuid.UUID(text))
        except (OSError, ValueError):
            pid = str(uuid.uuid4())
            write_atomic(path, (pid + "\n").encode("ascii"), 0o644)
            return pid

    def entrypoint_names(self):
        """The allowlist's entrypoints; None (logged once) while it cannot be loaded."""
        try:
            cfg = self.agent.Config(self.cfg.allowlist)
            cfg.load()
        except Exception as exc:
            problem = "%s: %s" % (type(exc).__name__, exc)
            if problem != self.allowlist_problem:
                self.allowlist_problem = problem
                self.log("the allowlist %s cannot be loaded (%s); no job is claimed until "
                         "it is fixed" % (self.cfg.allowlist, problem))
            return None
        if self.allowlist_problem is not None:
            self.allowlist_problem = None
            self.log("the allowlist %s loads again: claiming jobs" % self.cfg.allowlist)
        return sorted(cfg.entrypoints)

    def start_job(self, job, record=None, holds_slot=True):
        run_id = job["id"]
        with self.jobs_lock:
            old = self.jobs.get(run_id)
        if old is not None:
            old.join()
        j = Job(self, job, record)

        def body():
            try:
                j.main(recovering=record is not None)
            finally:
                with self.jobs_lock:
                    if self.jobs.get(run_id) is threading.current_thread():
                        del self.jobs[run_id]
                if holds_slot:
                    self.slots.release()

        t = threading.Thread(target=body, name="job-" + run_id[:8])
        with self.jobs_lock:
            self.jobs[run_id] = t
        t.start()
        return t

    def recover(self):
        for name in sorted(os.listdir(self.cfg.state)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.cfg.state, name)
            try:
                with open(path, "rb") as f:
                    record = json.loads(f.read().decode("utf-8"))
                job = record["job"]
                job["id"], job["lease"]["id"]  # noqa: B018 - the keys must be there
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.log("state file %s cannot be read (%s); moved aside" % (path, exc))
                try:
                    os.rename(path, path + ".bad")
                except OSError:
                    pass
                continue
            # a recovered job takes a slot if one is free (it may exceed them)
            self.start_job(job, record, holds_slot=self.slots.acquire(blocking=False))

    def claim(self):
        names = self.entrypoint_names()
        if names is None:
            self.http._sleep(ALLOWLIST_RETRY, None)
            return None
        body = {"poller": {"id": self.id, "host": self.host, "version": POLLER_VERSION},
                "wait": self.cfg.wait, "entrypoints": names}
        resp = self.http.call("POST", "/site/claim", body=body, timeout=self.cfg.wait + 30,
                              what="claim")
        if resp.status == 204:
            return None
        if resp.status == 200:
            job = resp.json().get("job")
            if isinstance(job, dict) and isinstance(job.get("id"), str) and isinstance(
                    job.get("lease"), dict) and isinstance(job["lease"].get("id"), str):
                return job
            self.log("the claim's answer holds no valid job: %r" % resp.data[:200])
        else:
            self.log("claim: the server answered %d %s: %s"
                     % (resp.status, resp.error_code(), resp.error_message()))
        self.http._sleep(BACKOFF_MAX * random.uniform(0.5, 1.0), None)  # noqa: S311 - jitter
        return None

    def run(self, once=False):
        self.log("poller %s started (server %s, slots %d, allowlist %s)"
                 % (self.id, self.cfg.server, self.cfg.slots, self.cfg.allowlist))
        self.recover()
        claimed = False
        while not self.stop.is_set():
            if once and claimed:
                break
            if not self.slots.acquire(timeout=0.5):
                continue
            try:
                job = self.claim()
            except Stopping:
                self.slots.release()
                break
            except Exception as exc:
                self.slots.release()
                self.log("claim failed: %s: %s" % (type(exc).__name__, exc))
                self.stop.wait(BACKOFF_FIRST)
                continue
            if once:
                claimed = True
            if job is None:
                self.slots.release()
                continue
            if self.stop.is_set():
                self.log("run %s: claimed while stopping; the lease will expire and the "
                         "server hands it out again" % job["id"])
                self.slots.release()
                break
            self.start_job(job)
        while True:
            with self.jobs_lock:
                threads = list(self.jobs.values())
            if not threads:
                break
            for t in threads:
                while t.is_alive():
                    t.join(0.5)
        self.log("poller %s stopped" % self.id)
        return 0

    def on_signal(self, signum, frame):
        if not self.stop.is_set():
            self.log("signal %d: stopping (running entrypoints go on; a restarted poller "
                     "picks them up)" % signum)
        self.stop.set()
        self.http.break_connections()


# --------------------------------------------------------------------------------------
# --check
# --------------------------------------------------------------------------------------

def run_check(cfg):
    problems = []
    print("configuration %s" % cfg.path)
    for key in ("server", "token_file", "ca_file", "client_cert", "proxy", "allowlist",
                "agent", "slots", "wait", "state", "log", "cleanup"):
        print("  %-11s %s" % (key, getattr(cfg, key)))
    token = None
    try:
        token = cfg.read_token()
        print("token file: ok (mode 0600, owned by this user)")
    except ConfigError as exc:
        problems.append(str(exc))
    agent = None
    try:
        agent = load_agent(cfg.agent)
        acfg = agent.Config(cfg.allowlist)
        acfg.load()
        print("allowlist %s: root %s" % (cfg.allowlist, acfg.root))
        for name in sorted(acfg.entrypoints):
            ep = acfg.entrypoints[name]
            ok = ep.digest() == ep.sha256
            print("  entrypoint %-20s %s %s" % (name, ep.path, "sha256 ok" if ok else
                                                "SHA256 MISMATCH (re-approve it)"))
            if not ok:
                problems.append("entrypoint %s (%s) no longer has its pinned sha256; "
                                "re-approve it in the allowlist" % (name, ep.path))
        if not acfg.entrypoints:
            problems.append("the allowlist %s names no entrypoint" % cfg.allowlist)
    except ConfigError as exc:
        problems.append(str(exc))
    except Exception as exc:
        problems.append("the allowlist %s: %s" % (cfg.allowlist, exc))
    try:
        http_ = Http(cfg, token or "", Log(os.devnull), threading.Event())
    except (OSError, ssl.SSLError) as exc:
        problems.append("TLS settings: %s (ca_file %s, client_cert %s)"
                        % (exc, cfg.ca_file, cfg.client_cert))
        http_ = None
    if http_ is not None:
        try:
            resp = http_.once("GET", "/healthz", timeout=15, auth=False)
            if resp.status == 200:
                print("server %s: reachable (healthz ok)" % cfg.server)
            else:
                problems.append("server %s: /healthz answered %d" % (cfg.server, resp.status))
        except ssl.SSLError as exc:
            problems.append("server %s: TLS failed (%s)%s"
                            % (cfg.server, exc, tls_hint(exc, cfg)))
            resp = None
        except (OSError, http.client.HTTPException) as exc:
            problems.append("server %s: unreachable (%s: %s); check the URL, the proxy "
                            "and the firewall" % (cfg.server, type(exc).__name__, exc))
            resp = None
        if resp is not None and resp.status == 200 and token:
            # no harmless authenticated site call exists in protocol v1 (a claim takes a
            # job): a heartbeat for a run that does not exist is answered 404 (or 400)
            # once the token is accepted, 401/403 otherwise
            try:
                probe = http_.once("POST", "/site/jobs/%s/events" % uuid.uuid4(),
                                   body={"lease": str(uuid.uuid4())}, timeout=15)
                if probe.status in (401, 403):
                    problems.append("the server refuses the site token (%s): %s; put a valid "
                                    "site token in %s" % (probe.error_code(),
                                                          probe.error_message(),
                                                          cfg.token_file))
                else:
                    print("token: accepted by the server")
            except (OSError, http.client.HTTPException) as exc:
                problems.append("token check failed: %s" % exc)
    if problems:
        print("")
        for p in problems:
            print("PROBLEM: %s" % p)
        return 1
    print("ok")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="remote_exec_poller.py",
        description="remote-exec's site poller for the pull method")
    parser.add_argument("--config", required=True, help="the poller's JSON configuration")
    parser.add_argument("--once", action="store_true",
                        help="claim at most one job, handle it to the end, exit")
    parser.add_argument("--check", action="store_true",
                        help="check the configuration, the allowlist, the server, the token")
    args = parser.parse_args(argv)
    try:
        cfg = Config(args.config)
    except ConfigError as exc:
        sys.stderr.write("remote-exec poller: %s\n" % exc)
        return 2
    if args.check:
        return run_check(cfg)
    log = Log(cfg.log)
    try:
        poller = Poller(cfg, log)
    except (ConfigError, OSError, ssl.SSLError) as exc:
        sys.stderr.write("remote-exec poller: %s\n" % exc)
        log("cannot start: %s" % exc)
        return 2
    signal.signal(signal.SIGTERM, poller.on_signal)
    signal.signal(signal.SIGINT, poller.on_signal)
    return poller.run(once=args.once)


if __name__ == "__main__":
    sys.exit(main())
