"""Helpers of tests/test_poller.py: a site for the poller (allowlist, entrypoints, config),
the poller as a subprocess, a small submit-side client, and ``FakeQueue``, a stand-in
for the site role of the queue server (docs/pull-protocol.md), in-process over real TLS,
used where a test must script the server's answers (503, 401, counting requests)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POLLER = REPO / "remote-side_scripts" / "remote_exec_poller.py"
AGENT = REPO / "remote-side_scripts" / "remote_exec_agent.py"
#: the Python that runs the poller (and so the agent), e.g. a Python 3.6 to run
#: tests/test_poller.py against it
POLLER_PYTHON = os.environ.get("REMOTE_EXEC_POLLER_PYTHON", sys.executable)

#: what every entrypoint of these tests does first: one line per start in a marker file
WORKER = r"""#!/bin/sh
echo "started $REMOTE_EXEC_RUN_ID" >> "$RE_marker"
echo "hello from the entrypoint"
echo "mode=$RE_mode"
if [ -n "$RE_sleep" ]; then
  trap 'echo got TERM >> "$RE_marker.term"; exit 143' TERM
  i=0
  while [ "$i" -lt "$RE_sleep" ]; do sleep 0.1; i=$((i + 1)); done
fi
for f in *.in; do [ -f "$f" ] && cat "$f" > "out-$f.txt"; done
printf 'result %s\n' "$RE_mode" > result.txt
printf 'secret\n' > secret.key
printf 'spaces\n' > 'with space.txt'
printf 'quote\n' > "it's \"q\".txt"
printf 'newline\n' > "$(printf 'new\nline.txt')"
mkdir -p sub/deeper
printf 'deep\n' > sub/deeper/d.dat
exit "${RE_code:-0}"
"""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Site:
    """A site: the agent's allowlist, one entrypoint ``worker``, a poller config."""

    def __init__(self, base: Path, server_url: str, ca_file: str, token: str,
                 **config) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.root = base / "runs"
        self.conf = base / "site"
        self.conf.mkdir(exist_ok=True)
        self.marker = base / "marker.txt"
        self.worker = self.conf / "worker.sh"
        self.worker.write_text(WORKER)
        self.allowlist = self.conf / "allowlist.json"
        self.allowlist.write_text(json.dumps({
            "version": 1, "root": str(self.root), "state": str(self.conf / "agent-state"),
            "log": str(self.conf / "agent.log"),
            "entrypoints": {"worker": {
                "path": str(self.worker),
                "sha256": sha256_bytes(self.worker.read_bytes()),
                "interpreter": ["/bin/sh"],
                "parameters": {
                    "marker": {"type": "path", "required": True},
                    "mode": {"type": "choice", "choices": ["fast", "slow"],
                             "default": "fast"},
                    "sleep": {"type": "int", "min": 0, "max": 100000},
                    "code": {"type": "int", "min": 0, "max": 255, "default": 0},
                }}},
            "returns": {"never": ["*.key"]},
        }, indent=1))
        self.token_file = self.conf / "token"
        self.set_token(token)
        self.config = self.conf / "poller.json"
        cfg = {"version": 1, "server": server_url, "token_file": "token",
               "ca_file": ca_file, "proxy": None, "allowlist": "allowlist.json",
               "agent": str(AGENT), "slots": 1, "wait": 5, "state": "poller-state",
               "log": "poller.log", "cleanup": "on-success"}
        cfg.update(config)
        self.config.write_text(json.dumps(cfg, indent=1))
        self.procs: list[subprocess.Popen] = []

    def set_token(self, token: str, mode: int = 0o600) -> None:
        if self.token_file.exists():
            self.token_file.unlink()
        self.token_file.write_text(token + "\n")
        os.chmod(self.token_file, mode)

    def params(self, **more) -> dict:
        out = {"marker": str(self.marker)}
        out.update(more)
        return out

    def starts(self) -> list[str]:
        if not self.marker.exists():
            return []
        return self.marker.read_text().splitlines()

    def log(self) -> str:
        path = self.conf / "poller.log"
        return path.read_text() if path.exists() else ""

    def run_dirs(self) -> list[str]:
        return sorted(os.listdir(self.root)) if self.root.exists() else []

    def state_files(self) -> list[str]:
        d = self.conf / "poller-state"
        return sorted(p for p in os.listdir(d) if p.endswith(".json")) if d.exists() else []

    def poller(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        full = dict(os.environ)
        full.update(env or {})
        proc = subprocess.Popen([POLLER_PYTHON, str(POLLER), "--config", str(self.config),
                                 *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=full, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                    proc.terminate()
                    proc.wait(15)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    proc.kill()
                    proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()


def wait_for(predicate, timeout: float, what: str, step: float = 0.05):
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(step)


# --------------------------------------------------------------------------------------
# FakeQueue: the site role only, for scripted answers
# --------------------------------------------------------------------------------------

def make_certs(directory: Path):
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    chain = directory / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    return str(ca_file), str(chain)


class FakeQueue:
    """A minimal queue server (site role) with jobs added by the test.

    ``script``: a list of (method-and-path-prefix, status, headers, body) answers given
    once each before normal handling, to simulate 503/401/... . ``requests`` counts every
    request by (method, first path segment after /site/)."""

    def __init__(self, directory: Path, ttl: int = 90, heartbeat: int = 30):
        self.directory = directory
        self.ttl = ttl
        self.heartbeat = heartbeat
        self.ca_file, chain = make_certs(directory)
        self.lock = threading.Condition()
        self.jobs: dict[str, dict] = {}
        self.queue: list[str] = []
        self.requests: list[tuple[str, str, int]] = []
        self.script: list[tuple[str, int, dict, bytes]] = []
        self.revoked: set[str] = set()
        #: serve inputs with their last byte changed (a digest mismatch on the site)
        self.corrupt_inputs = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.handle(self)

            do_POST = do_PUT = do_GET

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(chain)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/re-pull/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def site_token(self, site: str) -> str:
        return "re1_fake_" + site

    def add_job(self, site: str, entrypoint: str, params: dict,
                inputs: dict[str, bytes] | None = None,
                returns: list[str] | None = None) -> str:
        run_id = str(uuid.uuid4())
        with self.lock:
            self.jobs[run_id] = {
                "id": run_id, "site": site, "entrypoint": entrypoint, "params": params,
                "inputs": {k: v for k, v in (inputs or {}).items()},
                "returns": returns or ["**"], "state": "queued", "lease": None,
                "events": [], "log": b"", "outputs": {}, "finish": None, "cancel": False,
                "attempt": 0,
            }
            self.queue.append(run_id)
            self.lock.notify_all()
        return run_id

    def wait_finished(self, run_id: str, timeout: float = 30) -> dict:
        end = time.monotonic() + timeout
        with self.lock:
            while self.jobs[run_id]["finish"] is None:
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError("run {} did not finish: {}".format(
                        run_id, self.jobs[run_id]["state"]))
                self.lock.wait(left)
            return self.jobs[run_id]

    def count(self, kind: str) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r[1] == kind)

    # -- handling ----------------------------------------------------------------------

    def _send(self, h, status, body=None, headers=None):
        data = b""
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
        elif isinstance(body, bytes):
            data = body
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        if isinstance(body, (dict, list)):
            h.send_header("Content-Type", "application/json")
        h.end_headers()
        if data:
            h.wfile.write(data)

    def _error(self, h, status, code, message="", **extra):
        body = {"error": dict({"code": code, "message": message or code}, **extra)}
        self._send(h, status, body)

    def handle(self, h):
        url = urllib.parse.urlsplit(h.path)
        path = url.path[len("/re-pull/v1"):]
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        parts = path.split("/")
        kind = parts[2] if path.startswith("/site/") and len(parts) > 2 else path
        if path.startswith("/site/jobs/") and len(parts) > 4:
            kind = parts[4]
        with self.lock:
            for i, (prefix, status, headers, answer) in enumerate(self.script):
                if (f"{h.command} {path}").startswith(prefix):
                    del self.script[i]
                    self.requests.append((h.command, kind, status))
                    self._send(h, status, answer, headers)
                    return
        if path == "/healthz":
            self._send(h, 200, b"ok")
            return
        auth = h.headers.get("Authorization", "")
        token = auth[len("Bearer "):]
        site = token[len("re1_fake_"):] if token.startswith("re1_fake_") else None
        if site is None or token in self.revoked:
            code = "token_revoked" if token in self.revoked else "unauthenticated"
            with self.lock:
                self.requests.append((h.command, kind, 401))
            self._error(h, 401, code, "the token is refused")
            return
        with self.lock:
            self.requests.append((h.command, kind, 0))
        if path == "/site/claim":
            req = json.loads(body)
            end = time.monotonic() + min(req.get("wait", 0), 55)
            with self.lock:
                def mine():
                    return [r for r in self.queue if self.jobs[r]["site"] == site]
                while not mine():
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self.lock.wait(left)
                if not mine():
                    self._send(h, 204)
                    return
                job = self.jobs[mine()[0]]
                self.queue.remove(job["id"])
                job["state"] = "claimed"
                job["attempt"] += 1
                job["lease"] = str(uuid.uuid4())
                job["expires"] = time.monotonic() + self.ttl
                answer = {"id": job["id"], "lease": {
                    "id": job["lease"], "expires_at": "2099-01-01T00:00:00Z",
                    "ttl": self.ttl, "heartbeat": self.heartbeat},
                    "entrypoint": job["entrypoint"], "params": job["params"],
                    "inputs": [{"path": p, "size": len(d), "sha256": sha256_bytes(d),
                                "mode": 0o644} for p, d in job["inputs"].items()],
                    "returns": job["returns"], "attempt": job["attempt"], "cancel_grace": 2}
            self._send(h, 200, {"job": answer})
            return
        run_id = parts[3] if len(parts) > 3 else ""
        with self.lock:
            job = self.jobs.get(run_id)
            if job is None or job["site"] != site:
                self._error(h, 404, "not_found")
                return
            lease = h.headers.get("X-RE-Lease")
            if kind in ("events", "finish"):
                lease = json.loads(body).get("lease")
            if (job["state"] in ("claimed", "staging", "staged")
                    and time.monotonic() > job["expires"]):
                job["lease"] = None  # expired before launching: queued again
                job["state"] = "queued"
                self.queue.append(run_id)
                self.lock.notify_all()
            if lease != job["lease"]:
                self._error(h, 409, "lease_lost")
                return
            job["expires"] = time.monotonic() + self.ttl
            tail = urllib.parse.unquote("/".join(parts[5:]))
            if kind == "inputs":
                data = job["inputs"][tail]
                if self.corrupt_inputs:
                    data = data[:-1] + bytes([data[-1] ^ 1])
                start = 0
                rng = h.headers.get("Range")
                status = 200
                if rng:
                    start = int(rng[len("bytes="):-1])
                    status = 206
                self._send(h, status, data[start:], {"X-RE-SHA256": sha256_bytes(data)})
            elif kind == "events":
                req = json.loads(body)
                if req.get("state"):
                    job["state"] = req["state"]
                    job["events"].append(req)
                    self.lock.notify_all()
                self._send(h, 200, {"lease_expires_at": "2099-01-01T00:00:00Z",
                                    "cancel": job["cancel"]})
            elif kind == "log":
                offset = int(urllib.parse.parse_qs(url.query)["offset"][0])
                if offset > len(job["log"]):
                    self._error(h, 409, "state", log_size=len(job["log"]))
                    return
                job["log"] = job["log"][:offset] + body if offset + len(body) > len(
                    job["log"]) else job["log"]
                self._send(h, 200, {"log_size": len(job["log"])})
            elif kind == "outputs":
                if sha256_bytes(body) != h.headers.get("X-RE-SHA256"):
                    self._error(h, 422, "digest_mismatch")
                    return
                job["outputs"][tail] = body
                self._send(h, 201, {"size": len(body), "sha256": sha256_bytes(body)})
            elif kind == "finish":
                req = json.loads(body)
                job["finish"] = req
                job["state"] = "finished"
                self.lock.notify_all()
                self._send(h, 200, {"id": run_id, "state": "finished"})
            else:
                self._error(h, 404, "not_found")


class FakeSubmitter:
    """The submit side of a FakeQueue, shaped like HttpSubmitter."""

    def __init__(self, fake: FakeQueue, site: str):
        self.fake = fake
        self.site = site

    def submit(self, entrypoint: str, params: dict, inputs: dict[str, bytes] | None = None,
               returns: list[str] | None = None) -> str:
        return self.fake.add_job(self.site, entrypoint, params, inputs, returns)

    def run(self, run_id: str) -> dict:
        with self.fake.lock:
            job = self.fake.jobs[run_id]
            fin = job["finish"] or {}
            return {"id": run_id, "state": job["state"], "attempt": job["attempt"],
                    "outcome": fin.get("outcome"), "exit_code": fin.get("exit_code"),
                    "reason": fin.get("reason"), "message": fin.get("message"),
                    "outputs": fin.get("outputs", []), "held_back": fin.get("held_back", []),
                    "log_size": len(job["log"])}

    def wait(self, run_id: str, states: tuple[str, ...], timeout: float = 30) -> dict:
        return wait_for(lambda: (lambda r: r if r["state"] in states else None)(
            self.run(run_id)), timeout, f"run {run_id} in {states}")

    def output(self, run_id: str, path: str) -> bytes:
        with self.fake.lock:
            return self.fake.jobs[run_id]["outputs"][path]

    def log(self, run_id: str) -> bytes:
        with self.fake.lock:
            return self.fake.jobs[run_id]["log"]

    def cancel(self, run_id: str) -> None:
        with self.fake.lock:
            self.fake.jobs[run_id]["cancel"] = True


class HttpSubmitter:
    """The submit role of docs/pull-protocol.md, over HTTPS with http.client."""

    def __init__(self, url: str, ca_file: str, token: str, site: str,
                 cert: tuple | None = None):
        self.url = urllib.parse.urlsplit(url)
        self.ctx = ssl.create_default_context(cafile=ca_file)
        if cert:
            self.ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        self.token = token
        self.site = site

    def request(self, method: str, path: str, body=None, headers=None, timeout=60):
        import http.client

        conn = http.client.HTTPSConnection(self.url.hostname, self.url.port,
                                           context=self.ctx, timeout=timeout)
        try:
            hdrs = {"Authorization": "Bearer " + self.token}
            hdrs.update(headers or {})
            if isinstance(body, dict):
                body = json.dumps(body).encode()
                hdrs["Content-Type"] = "application/json"
            conn.request(method, self.url.path.rstrip("/") + path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body=None, ok=(200, 201, 202), timeout=60):
        status, _, data = self.request(method, path, body, timeout=timeout)
        assert status in ok, (method, path, status, data)
        return json.loads(data) if data else {}

    def submit(self, entrypoint: str, params: dict, inputs: dict[str, bytes] | None = None,
               returns: list[str] | None = None) -> str:
        run_id = str(uuid.uuid4())
        inputs = inputs or {}
        self.json("POST", "/runs", {
            "id": run_id, "site": self.site, "entrypoint": entrypoint, "params": params,
            "inputs": [{"path": p, "size": len(d), "sha256": sha256_bytes(d), "mode": 0o644}
                       for p, d in inputs.items()],
            "returns": returns or ["**"], "queue_timeout": 600})
        for p, d in inputs.items():
            status, _, data = self.request(
                "PUT", "/runs/{}/inputs/{}".format(run_id, urllib.parse.quote(p, safe="/")), d,
                {"Content-Length": str(len(d)), "X-RE-SHA256": sha256_bytes(d),
                 "Content-Type": "application/octet-stream"})
            assert status in (200, 201), (status, data)
        self.json("POST", f"/runs/{run_id}/submit", {})
        return run_id

    def run(self, run_id: str) -> dict:
        return self.json("GET", f"/runs/{run_id}")

    def wait(self, run_id: str, states: tuple[str, ...], timeout: float = 30) -> dict:
        end = time.monotonic() + timeout
        run = self.run(run_id)
        while run["state"] not in states:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"run {run_id} is {run['state']}, not in {states}")
            wait = max(1, min(int(left), 20))
            run = self.json("GET", f"/runs/{run_id}?wait={wait}&after={run['version']}",
                            timeout=left + 30)
        return run

    def output(self, run_id: str, path: str) -> bytes:
        status, headers, data = self.request(
            "GET", "/runs/{}/outputs/{}".format(run_id, urllib.parse.quote(path, safe="/")))
        assert status == 200, (status, data)
        return data

    def log(self, run_id: str) -> bytes:
        status, _, data = self.request("GET", f"/runs/{run_id}/log?offset=0")
        assert status == 200, (status, data)
        return data

    def cancel(self, run_id: str) -> None:
        self.json("POST", f"/runs/{run_id}/cancel", {})


class ConnectProxy:
    """An HTTP CONNECT proxy on 127.0.0.1 (a free port) that records what it was asked:
    ``requests`` holds (request line, Proxy-Authorization or None) per tunnel."""

    def __init__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.requests: list[tuple[str, str | None]] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client):
        import socket

        data = b""
        while b"\r\n\r\n" not in data:
            chunk = client.recv(4096)
            if not chunk:
                client.close()
                return
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        auth = None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "proxy-authorization":
                auth = value.strip()
        self.requests.append((lines[0], auth))
        method, target, _ = lines[0].split(" ", 2)
        host, port = target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if rest:
            upstream.sendall(rest)

        def pipe(a, b):
            try:
                while True:
                    chunk = a.recv(65536)
                    if not chunk:
                        break
                    b.sendall(chunk)
            except OSError:
                pass
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)
        client.close()
        upstream.close()

    def close(self):
        self.closed = True
        self.sock.close()
