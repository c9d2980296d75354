"""The ``slurmrest`` backend's pure parts: the two dialects' builders and parsers on
answers recorded from a real slurmrestd (tests/data/slurmrest/) and on the FRCE
seed's shapes, the token's expiry and renewal, and the site's settings."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import pytest

from remote_exec import redact
from remote_exec.backends.scheduler import Resources
from remote_exec.backends.slurmrest import dialects
from remote_exec.backends.slurmrest.auth import JwtAuth, jwt_times, token_from_output
from remote_exec.backends.slurmrest.client import Answer, summary
from remote_exec.backends.slurmrest.settings import SlurmRestSettings
from remote_exec.errors import AuthError, ConfigError

DATA = Path(__file__).resolve().parent / "data" / "slurmrest" / "v0.0.38"


def recorded(name: str) -> Answer:
    data = json.loads((DATA / f"{name}.json").read_text())
    return Answer(data["status"], data["body"], data.get("content_type", ""))


def test_version_is_chosen_from_what_the_server_serves() -> None:
    paths = recorded("openapi_v3_paths").body["paths"]
    offered = dialects.offered_versions(paths)
    assert offered == ["v0.0.36", "v0.0.37", "v0.0.38"]
    assert dialects.choose_version(offered, "auto") == "v0.0.38"
    assert dialects.choose_version(offered, "v0.0.37") == "v0.0.37"
    with pytest.raises(ConfigError, match="does not serve v0.0.38"):
        dialects.choose_version(["v0.0.36"], "v0.0.38")
    with pytest.raises(ConfigError, match="remote-exec speaks") as err:
        dialects.choose_version(["v0.0.40", "v0.0.41"], "auto")
    assert "v0.0.40, v0.0.41" in err.value.message and "slurm" in (err.value.hint or "")
    with pytest.raises(ConfigError, match="not one remote-exec speaks"):
        dialects.choose_version(offered, "v0.0.99")


def test_submit_body_carries_every_resource_and_the_traps() -> None:
    r = Resources.parse({"nodes": 1, "tasks": 2, "cpus_per_task": 3, "memory": "2G",
                         "walltime": "1:30:01", "queue": "debug", "project": "p1"}, "t")
    body = dialects.submit_body("#!/bin/sh\nexec x\n", name="re-1", rundir="/r/1",
                                output="/r/1/.remote-exec/scheduler.out", r=r)
    job = body["job"]
    assert body["script"].startswith("#!")
    assert job["no_requeue"] is True and "requeue" not in job  # "requeue": false is ignored
    assert job["environment"]["PATH"]  # mandatory (error 2127 without it)
    assert job["current_working_directory"] == "/r/1"  # else the daemon's own cwd
    assert (job["nodes"], job["tasks"], job["cpus_per_task"]) == (1, 2, 3)
    assert job["memory_per_node"] == 2048 and job["time_limit"] == 91  # minutes, rounded up
    assert job["partition"] == "debug" and job["account"] == "p1"
    bare = dialects.submit_body("#!/bin/sh\n", name="n", rundir="/r", output="/o",
                                r=Resources())["job"]
    assert not {"nodes", "tasks", "partition", "time_limit"} & set(bare)


def test_submit_answers() -> None:
    assert dialects.parse_submitted(recorded("submit_ok")) == "2"
    held = recorded("submit_hold")  # a job id WITH errors: success
    assert dialects.parse_submitted(held) == "4"
    bad = recorded("submit_invalid_partition")
    assert dialects.parse_submitted(bad) is None and not dialects.transient(bad)
    assert "Invalid partition name specified (error 2000)" in summary(bad)
    for name in ("submit_without_environment", "submit_unknown_key"):
        answer = recorded(name)
        assert dialects.parse_submitted(answer) is None and not dialects.transient(answer)
    assert dialects.transient(recorded("ctld_down"))


@pytest.mark.parametrize("name, native, state, code", [
    ("job_running", "RUNNING", "running", None),
    ("job_pending_held", "PENDING", "queued", None),
    ("job_completed_exit0", "COMPLETED", "completed", 0),
    ("job_failed_exit3", "FAILED", "failed", 3),       # raw 768
    ("job_cancelled_running", "CANCELLED", "cancelled", 143),  # raw 15: TERM
    ("job_timeout", "TIMEOUT", "timed_out", 143),
])
def test_job_answers(name: str, native: str, state: str, code: int | None) -> None:
    answer = recorded(name)
    job_id = str(answer.body["jobs"][0]["job_id"])
    info = dialects.parse_job(answer, job_id)
    assert info is not None
    assert (info.native, info.state, info.exit_code) == (native, state, code)
    assert info.submitted is not None
    if state != "queued":
        assert info.started is not None and info.nodes
    if info.terminal:
        assert info.ended is not None and info.run_time is not None


def test_unknown_job_and_errors() -> None:
    assert dialects.parse_job(recorded("job_unknown"), "999999") is None
    for name in ("ctld_down", "expired_token"):  # both -1: no answer, not "unknown"
        with pytest.raises(ValueError, match="Unspecified error"):
            dialects.parse_job(recorded(name), "2")
    assert dialects.error_numbers(recorded("delete_unknown").body) == [dialects.NO_SUCH_JOB]


def test_wait_status() -> None:
    assert [dialects.wait_status(v) for v in (0, 768, 15, 9, 36608, -1, None)] == \
        [0, 3, 143, 137, 143, None, None]


def test_find_a_job_by_name_and_directory() -> None:
    listing = recorded("jobs_listing")
    job = listing.body["jobs"][0]
    name, cwd = job["name"], job["current_working_directory"]
    assert dialects.find_job(listing, name, cwd) == str(job["job_id"])
    assert dialects.find_job(listing, name, cwd + "/other") is None
    assert dialects.find_job(listing, "re-nothing", cwd) is None


# -- FRCE ---------------------------------------------------------------------------------------

def test_frce_body_uses_the_seeds_names() -> None:
    r = Resources.parse({"tasks": 4, "cpus_per_task": 2, "memory": "4G",
                         "walltime": "1-02:03:04", "queue": "norm"}, "t")
    body = dialects.frce_body("#!/bin/sh\nexec x\n", r)
    assert body == {"script-body": "#!/bin/sh\nexec x\n", "partition": "norm", "ntasks": 4,
                    "cpus-per-task": 2, "mem-per-node": "4096M", "timelimit": "01-02:03:04"}
    assert "mem-per-cpu" not in body  # never both (conflicting_mem_specifications)
    with pytest.raises(ConfigError, match="needs a partition"):
        dialects.frce_body("x", Resources())
    with pytest.raises(ConfigError, match="no field for nodes"):
        dialects.frce_body("x", Resources(nodes=2, queue="norm"))
    assert dialects.frce_time(59) == "00-00:00:59"


@pytest.mark.parametrize("body, expected", [
    ({"status": "call_success", "reason": "46185772"}, ("46185772", False)),
    ({"Status": "call success", "Reason": "46185772"}, ("46185772", False)),  # the prose
    ({"status": "call_failure", "reason": "bad_partition"}, (None, False)),
    ({"status": "call_failure", "reason": "backend_query_malloc_failed"}, (None, True)),
    ({"status": "call_failure", "reason": "something new"}, (None, False)),
])
def test_frce_submit_answers(body: dict, expected: tuple) -> None:
    job_id, why, _, later = dialects.frce_submitted(Answer(200, body))
    assert (job_id, later) == expected
    if job_id is None:
        assert why


def test_frce_severe_error_is_worth_a_later_try() -> None:
    job_id, why, _, later = dialects.frce_submitted(Answer(500, "Internal error", "text/plain"))
    assert job_id is None and later and "Internal error" in why


def test_frce_query_status() -> None:
    body = {"status": "call_success", "reason": "query_success",
            "46185772": {"user": "u", "name": "u-", "partition": "norm",
                         "start": "2019-10-21T22:46:41", "end": "2019-10-26T22:46:41",
                         "state": "RUNNING"},
            "46185773": {"user": "u", "name": "u-", "partition": "norm", "start": "Unknown",
                         "end": "Unknown", "state": "PENDING"},
            "46185770": {"user": "u", "name": "u-", "partition": "quick",
                         "start": "2019-10-21T20:00:00", "end": "2019-10-21T20:00:05",
                         "state": "COMPLETED"}}
    answer = Answer(200, body)
    running = dialects.frce_job(answer, "46185772")
    assert running is not None and running.state == "running" and running.started
    assert running.ended is None  # its "end" is only the expected one
    pending = dialects.frce_job(answer, "46185773")
    assert pending is not None and pending.state == "queued" and pending.started is None
    done = dialects.frce_job(answer, "46185770")
    assert done is not None and done.run_time == 5.0
    assert dialects.frce_job(answer, "1") is None
    assert dialects.frce_new_jobs(answer, {"46185772"}, "norm") == ["46185773"]
    assert dialects.frce_new_jobs(answer, set(), None, live_only=False) == \
        ["46185770", "46185772", "46185773"]
    with pytest.raises(ValueError):
        dialects.frce_job(Answer(503, "busy"), "1")


# -- tokens and settings ------------------------------------------------------------------------

def _jwt(iat: float, exp: float) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    header, claims = {"alg": "HS256", "typ": "JWT"}, {"iat": iat, "exp": exp, "sun": "u"}
    return f"{part(header)}.{part(claims)}.sig"


def test_token_times_and_output() -> None:
    token = _jwt(1000, 2800)
    assert jwt_times(token) == (1000.0, 2800.0)
    assert jwt_times("not-a-token") == (None, None)
    assert token_from_output(f"SLURM_JWT={token}\n") == token
    assert token_from_output(f"banner line\n{token}\n") == token
    assert token_from_output("nothing here") == ""


def test_token_is_renewed_before_it_expires() -> None:
    now = time.time()
    calls: list[list[str]] = []

    async def remote(argv: list[str]) -> str:
        calls.append(argv)
        return f"SLURM_JWT={_jwt(time.time(), time.time() + 30)}\n"

    settings = SlurmRestSettings(url="http://x", token_command=["scontrol", "token"],
                                 auth="jwt")
    auth = JwtAuth(settings, "u", "s", remote)
    headers = asyncio.run(auth.headers())
    assert headers["X-SLURM-USER-NAME"] == "u" and len(calls) == 1
    assert auth.lifespan == pytest.approx(30, abs=1)
    assert not auth.due(now + 10)  # 20 s left of 30: fine
    assert auth.due(now + 16)  # under half its life left: renew first
    assert headers["X-SLURM-USER-TOKEN"] not in repr(auth)
    assert redact.redact(f"t={headers['X-SLURM-USER-TOKEN']}") == f"t={redact.MASK}"


def test_an_expired_token_file_says_how_to_make_one(tmp_path: Path) -> None:
    path = tmp_path / "jwt"
    path.write_text(_jwt(time.time() - 100, time.time() - 10) + "\n")
    path.chmod(0o600)
    auth = JwtAuth(SlurmRestSettings(url="http://x", token_file=str(path), auth="jwt"),
                   "u", "s")
    with pytest.raises(AuthError, match="expired") as err:
        asyncio.run(auth.headers())
    assert "scontrol token" in (err.value.hint or "")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        asyncio.run(auth.headers())


@pytest.mark.parametrize("values, words", [
    (None, "needs a `slurmrest:` section"),
    ({"url": "http://x", "dialect": "frce", "auth": "jwt"}, "does not fit dialect"),
    ({"url": "http://x", "token_file": "a", "token_command": ["b"]}, "not both"),
    ({"url": "http://x", "dialect": "frce", "api_version": "v0.0.38"}, "slurmrestd only"),
])
def test_settings_errors(values: dict | None, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        SlurmRestSettings.from_site(values, "site 'x'")


def test_settings_defaults_per_dialect() -> None:
    assert SlurmRestSettings.from_site({"url": "http://x/"}, "s").auth == "jwt"
    frce = SlurmRestSettings.from_site({"url": "https://h/hpcapi", "dialect": "frce"}, "s")
    assert frce.auth == "negotiate" and frce.url == "https://h/hpcapi" and frce.tls


def test_every_secret_file_follows_one_rule(tmp_path: Path) -> None:
    """The Fujitsu credentials file and the Slurm token file: one check (paths.read_private)."""
    from remote_exec.backends.fujitsu.auth import _from_file
    from remote_exec.backends.slurmrest.settings import read_secret_file

    path = tmp_path / "secret"
    path.write_text("REMOTE_EXEC_FUJITSU_TOKEN=abcd1234\n")
    path.chmod(0o640)
    for read in (lambda: _from_file(str(path), "s"), lambda: read_secret_file(str(path), "t")):
        with pytest.raises(ConfigError, match="readable by others") as err:
            read()
        assert err.value.hint == f"chmod 600 {path}"
    path.chmod(0o600)
    assert _from_file(str(path), "s") == {"REMOTE_EXEC_FUJITSU_TOKEN": "abcd1234"}
    with pytest.raises(ConfigError, match="cannot read"):
        read_secret_file(str(tmp_path / "missing"), "Slurm token file")


def test_an_agent_older_than_batch_jobs_is_named() -> None:
    """A restricted site's agent from before `launch --batch` refuses it with its usage
    line: the run stops before anything is submitted, naming `site install`."""
    from types import SimpleNamespace

    from remote_exec import backends
    from remote_exec.backends.agent_protocol import AgentRefused
    from remote_exec.config import Config

    config = Config(path=Path("test.yaml"), defaults={}, legacy={}, sites={"hpc": {
        "host": "h", "restricted": True, "backend": "slurmrest", "templates": ["generic"],
        "slurmrest": {"url": "https://slurm.example:6820", "token_file": "/nonexistent"}}})
    site = config.site("hpc")
    name = backends.for_site(site)
    backend = backends.make_backend(name, site, "run")
    old_usage = ("unexpected arguments; usage: launch RUN_ID ENTRYPOINT (parameters as a "
                 "JSON object on stdin)")  # what agent 2 before batch jobs answers

    class OldAgent:
        async def launch_batch(self, *args: object) -> None:
            raise AgentRefused(old_usage)

    async def conn() -> object:
        return object()

    backend.agent = OldAgent()  # type: ignore[attr-defined]
    backend.link = SimpleNamespace(conn=conn)  # type: ignore[attr-defined]
    run = SimpleNamespace(run_id="run", request=SimpleNamespace(
        entrypoint=SimpleNamespace(text="generic", params={})))
    with pytest.raises(ConfigError, match="cannot prepare batch jobs") as caught:
        asyncio.run(backend._claim(run))  # type: ignore[attr-defined]
    assert "site install hpc --apply" in (caught.value.hint or "")
