"""compat_v0: the queue server speaks MInt's original site protocol (opt-in).

The "old poller" here is written from the description of MInt's ``mi-system-remote.py``
(docs of the research note, A.2): urllib over TLS, ``Authorization: Bearer``, the seven
calls in order, inputs written from base64, a command (python code of the test doing
what the command would), the two stdout/stderr files it always adds, ``Error`` entries
for missing result files. The MInt side is the real CLI (``remote-exec legacy-pull``,
``backend: pull``) against a real ``remote-exec queue serve`` over TLS.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Cli
from pull_site import Ca, QueueServer, make_ca

COMMAND = "~/misrc_remote_workflow/scripts/execute_remote-side_program_api.sh"
STDOUT, STDERR = "計算標準出力.txt", "計算標準エラー出力.txt"
SITES = ["old-run", "old-abnormal", "old-missing", "old-auth", "old-race", "old-big",
         "old-again"]
MAX_JOB = 64 * 1024


class OldPoller:
    """The original poller's calls (each one HTTP request; no sleeps here)."""

    def __init__(self, base: str, port: int, site: str, token: str | None, ca: Ca) -> None:
        self.url = f"{base}:{port}/mi-distcomp-api"
        self.site = site
        self.token = token
        self.context = ssl.create_default_context(cafile=str(ca.ca_file))

    def call(self, method: str, name: str, body: dict | None = None,
             query: dict | None = None) -> tuple[int, Any]:
        url = f"{self.url}/{name}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as err:
            text = err.read()
            try:
                return err.code, json.loads(text)
            except ValueError:
                return err.code, text.decode(errors="replace")

    def request(self) -> tuple[int, dict]:
        return self.call("GET", "calc-request", query={"site_id": self.site})

    def post(self, name: str, accept_id: str, **extra: Any) -> dict:
        status, answer = self.call("POST", name, {"accept_id": accept_id,
                                                  "site_id": self.site, **extra})
        assert status == 200, answer
        return answer

    def wait_job(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, answer = self.request()
            assert status == 200, answer
            entry = answer["errors"][0]
            if entry["code"] == 200:
                return entry["accept_id"]
            assert entry["code"] == "0300", answer
            time.sleep(0.2)
        raise AssertionError("no job handed out")

    def run_job(self, accept_id: str, workdir: Path, command: Any,
                missing_ok: bool = False) -> dict:
        """calc-params ... end-send as the original: ``command(dir) -> (rc, out, err)``."""
        status, params = self.call("GET", "calc-params",
                                   query={"site_id": self.site, "accept_id": accept_id})
        assert status == 200 and "calc-info" in params, params
        info = params["calc-info"]
        self.post("calc-params-complete", accept_id)
        self.post("calc-start", accept_id)
        workdir.mkdir()
        for name, (content, _mime, charset) in info["parameter_files"].items():
            data = base64.b64decode(content)
            if charset in ("charset=utf-8", "charset=us-ascii"):
                (workdir / name.split("/")[-1]).write_text(data.decode("utf-8"))
            else:
                (workdir / name.split("/")[-1]).write_bytes(data)
        rc, out, err = command(workdir)
        declared = [n for n in info["result_files"]]
        ok = rc == 0 and any((workdir / n).exists() for n in declared)
        self.post("calc-end", accept_id, result="calc end" if ok else "abnormal")
        (workdir / STDOUT).write_bytes(out)
        (workdir / STDERR).write_bytes(err)
        files = {}
        for name in [*declared, STDOUT, STDERR]:
            path = workdir / name
            if path.exists():
                files[name] = {"content": base64.b64encode(path.read_bytes()).decode(),
                               "mimetype1": "text/plain;", "mimetype2": "charset=us-ascii"}
            else:
                files[name] = {"mimetype1": "Error",
                               "mimetype2": f"出力指定ファイル({name})がありませんでした。"}
        self.post("send-results", accept_id, result_files=files)
        self.post("end-send", accept_id, result="end send")
        return info


class Env:
    """A queue server with compat_v0 for SITES, the MInt side's configuration and CLI."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca = make_ca(tmp / "ca")
        self.server = QueueServer(tmp / "queue", self.ca, compat_v0={
            "enabled": True, "max_job_bytes": MAX_JOB, "reoffer_after": 1,
            "sites": {s: {"command": COMMAND, "entrypoint": "site"} for s in SITES}}).start()
        self.submit = self.server.token("submit")
        token_file = tmp / "submit.token"
        token_file.write_text(self.submit + "\n")
        token_file.chmod(0o600)
        self.tokens = {s: self.server.token("site", s) for s in SITES}
        entry = {"backend": "pull", "root": "/nonexistent", "retry_tries": 3,
                 "retry_max_interval": 1,
                 "pull": {"server": self.server.url, "token_file": str(token_file),
                          "ca_file": str(self.ca.ca_file), "queue_timeout": 60,
                          "poll_wait": 2,
                          "legacy_commands": {COMMAND: {"entrypoint": "site"}}}}
        self.config = tmp / "remote-exec.yaml"
        self.config.write_text(yaml.safe_dump({"sites": {s: entry for s in SITES}}))
        env = dict(os.environ)
        env.update({"REMOTE_EXEC_CONFIG": str(self.config),
                    "REMOTE_EXEC_STATE_DIR": str(tmp / "state"),
                    "XDG_CONFIG_HOME": str(tmp / "xdg-config")})
        env.pop("MISYSTEM_SITEID", None)
        self.cli = Cli(config=self.config, state=tmp / "state", env=env)
        self.procs: list[subprocess.Popen] = []

    def poller(self, site: str, token: str | None = "") -> OldPoller:
        return OldPoller("https://127.0.0.1", self.server.port, site,
                         self.tokens[site] if token == "" else token, self.ca)

    def legacy(self, site: str, work: Path, inputs: list[str],
               outputs: list[str]) -> subprocess.Popen:
        """``remote-exec legacy-pull`` (MInt's argument form) in the background."""
        work.mkdir(exist_ok=True)
        out = open(work.parent / f"{work.name}.out", "wb")  # noqa: SIM115
        err = open(work.parent / f"{work.name}.err", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "remote_exec", "legacy-pull", "https://mint.example", site,
             "mint-token", COMMAND, ":".join(inputs), ":".join(outputs)],
            cwd=work, env=self.cli.env, stdout=out, stderr=err)
        out.close()
        err.close()
        self.procs.append(proc)
        return proc

    def api(self, method: str, path: str, body: dict | None = None,
            data: bytes | None = None, headers: dict | None = None) -> tuple[int, Any]:
        """A call of protocol v1 with the submit token."""
        context = ssl.create_default_context(cafile=str(self.ca.ca_file))
        if body is not None:
            data = json.dumps(body).encode()
        request = urllib.request.Request(
            self.server.url + path, data=data, method=method,
            headers={"Authorization": f"Bearer {self.submit}",
                     "Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, context=context, timeout=30) as answer:
                raw = answer.read()
                return answer.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def queue_run(self, site: str, run_id: str, content: bytes = b"x",
                  returns: tuple[str, ...] = ("r.txt",)) -> None:
        """A run queued through protocol v1 (as the pull backend makes it)."""
        digest = hashlib.sha256(content).hexdigest()
        status, answer = self.api("POST", "/runs", {
            "id": run_id, "site": site, "entrypoint": "site", "returns": list(returns),
            "inputs": [{"path": "in.txt", "size": len(content), "sha256": digest}]})
        assert status == 201, answer
        status, answer = self.api("PUT", f"/runs/{run_id}/inputs/in.txt", data=content,
                                  headers={"X-RE-SHA256": digest,
                                           "Content-Type": "application/octet-stream"})
        assert status == 201, answer
        status, answer = self.api("POST", f"/runs/{run_id}/submit", {})
        assert status == 200, answer

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.server.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    made = Env(tmp_path_factory.mktemp("compat"))
    try:
        yield made
    finally:
        made.close()


def finish(proc: subprocess.Popen, work: Path) -> tuple[int, str]:
    rc = proc.wait(timeout=60)
    return rc, (work.parent / f"{work.name}.err").read_text()


def test_a_run_completes_byte_exact(env: Env, tmp_path: Path) -> None:
    work = tmp_path / "mint"
    work.mkdir()
    blob = bytes(range(256)) * 40 + b"\r\n\x00\xff"
    (work / "a.dat").write_text("alpha\n")
    (work / "blob.bin").write_bytes(blob)
    proc = env.legacy("old-run", work, ["a.dat", "blob.bin"], ["out.bin", "X X.dat"])
    poller = env.poller("old-run")
    accept_id = poller.wait_job()

    def command(d: Path) -> tuple[int, bytes, bytes]:
        (d / "out.bin").write_bytes((d / "blob.bin").read_bytes()[::-1])
        (d / "X X.dat").write_bytes((d / "a.dat").read_bytes() * 2)
        return 0, "計算しました\n".encode(), b"a warning\n"

    info = poller.run_job(accept_id, tmp_path / "site", command)
    assert info["command"] == COMMAND and info["remote-site"] == "old-run"
    assert info["parameters"] == ""
    assert sorted(info["parameter_files"]) == ["a.dat", "blob.bin"]
    assert info["parameter_files"]["blob.bin"][1:] == ["application/octet-stream;",
                                                       "charset=binary"]
    assert sorted(info["result_files"]) == ["X X.dat", "out.bin"]
    rc, err = finish(proc, work)
    assert rc == 0, err
    assert (work / "out.bin").read_bytes() == blob[::-1]
    assert (work / "X X.dat").read_text() == "alpha\nalpha\n"
    assert (work / "remote_program_exec.log").read_bytes() == \
        "計算しました\n".encode() + b"a warning\n"
    assert not (work / STDOUT).exists()
    # the run on the server: the same state machine as v1
    status, run = env.api("GET", f"/runs/{accept_id}")
    if status == 200:  # (legacy-pull may have deleted it already)
        assert (run["state"], run["outcome"], run["exit_code"]) == ("finished", "exited", 0)


def test_abnormal_is_exit_1(env: Env, tmp_path: Path) -> None:
    work = tmp_path / "mint"
    work.mkdir()
    (work / "in.txt").write_text("x\n")
    proc = env.legacy("old-abnormal", work, ["in.txt"], ["r.txt"])
    poller = env.poller("old-abnormal")
    accept_id = poller.wait_job()

    def command(d: Path) -> tuple[int, bytes, bytes]:
        (d / "r.txt").write_text("partial\n")
        return 2, b"", b"it failed\n"

    poller.run_job(accept_id, tmp_path / "site", command)
    rc, err = finish(proc, work)
    assert rc == 1, err
    assert (work / "r.txt").read_text() == "partial\n"  # results come back on failure
    assert (work / "remote_program_exec.log").read_text() == "it failed\n"


def test_missing_result_file_is_named(env: Env, tmp_path: Path) -> None:
    env.queue_run("old-missing", "missing-1", returns=("r.txt", "s[*].txt"))
    poller = env.poller("old-missing")
    accept_id = poller.wait_job()
    assert accept_id == "missing-1"

    def command(d: Path) -> tuple[int, bytes, bytes]:
        (d / "r.txt").write_text("made\n")
        return 0, b"no s*.txt made\n", b""

    # one declared result exists: "calc end"; the other comes as an Error entry
    info = poller.run_job(accept_id, tmp_path / "site", command)
    assert sorted(info["result_files"]) == ["r.txt", "s*.txt"]  # glob.escape-d: a name
    status, run = env.api("GET", "/runs/missing-1")
    assert (run["state"], run["outcome"], run["exit_code"]) == ("finished", "exited", 0)
    assert "s*.txt" in run["message"] and "missing" in run["message"]
    assert sorted(o["path"] for o in run["outputs"]) == ["r.txt", "remote_program_exec.log"]
    assert run["log_size"] == len(b"no s*.txt made\n")
    # a call about a finished run: an error answer in the old envelope
    status, answer = poller.call("POST", "calc-start",
                                 {"accept_id": accept_id, "site_id": "old-missing"})
    assert status == 200 and answer["errors"][0]["code"] == "400"
    # end-send said again: fine
    assert poller.post("end-send", accept_id)["errors"][0]["code"] == 200
    # nothing named: the original's rule says abnormal; the run completes all the same
    env.queue_run("old-missing", "missing-2")
    assert poller.wait_job() == "missing-2"
    poller.run_job("missing-2", tmp_path / "site2", lambda d: (0, b"", b""))
    status, run = env.api("GET", "/runs/missing-2")
    assert (run["state"], run["exit_code"]) == ("finished", 1)
    assert "r.txt" in run["message"]


def test_auth_and_site_errors(env: Env) -> None:
    # calc-request with nothing queued: the idle code
    status, answer = env.poller("old-auth").request()
    assert (status, answer["errors"][0]["code"]) == (200, "0300")
    # unknown site id (a valid site token): code "400" as the original
    other = OldPoller("https://127.0.0.1", env.server.port, "nowhere", env.tokens["old-auth"],
                      env.ca)
    status, answer = other.request()
    assert status == 200 and answer["errors"][0]["code"] == "400"
    assert "nowhere" in answer["errors"][0]["message"]
    # a token of another site, no token, a made-up token, a submit token: 403 "0005"
    for token in (env.tokens["old-run"], None, "anything-goes", env.submit):
        status, answer = env.poller("old-auth", token).request()
        assert status == 403, answer
        assert answer["errors"][0]["code"] == "0005"
    # an unknown accept_id
    status, answer = env.poller("old-auth").call(
        "GET", "calc-params", query={"site_id": "old-auth", "accept_id": "nope"})
    assert answer["errors"][0]["code"] == "0300"


def test_two_pollers_never_share_a_job(env: Env) -> None:
    ids = [f"race-{i}" for i in range(3)]
    for run_id in ids:
        env.queue_run("old-race", run_id)
    got: list[str] = []
    codes: list[Any] = []
    barrier = threading.Barrier(6)

    def ask() -> None:
        barrier.wait()
        status, answer = env.poller("old-race").request()
        entry = answer["errors"][0]
        codes.append(entry["code"])
        if entry["code"] == 200:
            got.append(entry["accept_id"])

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(got) == ids and codes.count("0300") == 3


def test_a_run_handed_out_but_never_asked_for_is_offered_again(env: Env) -> None:
    # the original ignores the first calc-request answer after its start
    env.queue_run("old-again", "again-1")
    poller = env.poller("old-again")
    assert poller.wait_job() == "again-1"
    status, answer = poller.request()
    assert answer["errors"][0]["code"] == "0300"  # not handed out twice at once
    time.sleep(1.2)  # reoffer_after: 1
    assert poller.wait_job() == "again-1"
    status, params = poller.call("GET", "calc-params",
                                 query={"site_id": "old-again", "accept_id": "again-1"})
    assert base64.b64decode(params["calc-info"]["parameter_files"]["in.txt"][0]) == b"x"
    # calc-params once only: a second poller asking for it gets an error, not the job
    status, again = poller.call("GET", "calc-params",
                                query={"site_id": "old-again", "accept_id": "again-1"})
    assert "calc-info" not in again and again["errors"][0]["code"] == "400"
    # a cancel on the MInt side ends the run; the old calls then get an error answer
    status, answer = env.api("POST", "/runs/again-1/cancel", {})
    assert status == 200 and answer["state"] == "cancelled"
    status, answer = poller.call("POST", "calc-params-complete",
                                 {"accept_id": "again-1", "site_id": "old-again"})
    assert answer["errors"][0]["code"] == "400" and "cancelled" in \
        answer["errors"][0]["message"]


def test_a_run_too_big_is_refused_at_creation(env: Env, tmp_path: Path) -> None:
    work = tmp_path / "mint"
    work.mkdir()
    (work / "big.bin").write_bytes(os.urandom(MAX_JOB + 1))
    proc = env.legacy("old-big", work, ["big.bin"], ["r.txt"])
    rc, err = finish(proc, work)
    assert rc != 0
    assert "compat_v0.max_job_bytes" in err and str(MAX_JOB) in err, err
    status, answer = env.poller("old-big").request()
    assert answer["errors"][0]["code"] == "0300"
    # a run that names no result file (the original would call it abnormal): refused too
    status, answer = env.api("POST", "/runs", {"id": "no-names", "site": "old-big",
                                               "entrypoint": "site", "returns": ["**"]})
    assert status == 400 and "named exactly" in answer["error"]["message"]
    # another entrypoint of a compat site: left for protocol v1 pollers
    status, answer = env.api("POST", "/runs", {"id": "v1-only", "site": "old-big",
                                               "entrypoint": "generic", "returns": ["**"]})
    assert status == 201, answer


def test_compat_disabled_is_404(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    server = QueueServer(tmp_path / "queue", ca).start()
    try:
        token = server.token("site", "old-run")
        status, answer = OldPoller("https://127.0.0.1", server.port, "old-run", token,
                                   ca).request()
        assert status == 404
    finally:
        server.stop()
