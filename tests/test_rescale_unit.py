"""The ``rescale`` backend's parts: settings, status mapping, the streamed multipart body,
paging, and an upload/download round trip against the simulator (memory bounded)."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import pytest
from rescale_sim import RescaleSim

from remote_exec.backends.rescale.api import CHUNK, ApiError, RescaleApi, _Multipart
from remote_exec.backends.rescale.backend import COMMAND, describe, pack, submitted
from remote_exec.backends.rescale.client import job_info
from remote_exec.backends.rescale.settings import RescaleSettings, check_section
from remote_exec.backends.scheduler import CANCELLED, COMPLETED, QUEUED, RUNNING
from remote_exec.errors import AuthError, ConfigError

pytestmark = pytest.mark.timeout(60)


def settings(url: str, **more: object) -> RescaleSettings:
    return RescaleSettings.from_site({"platform": url, "hardware": {"coreType": "hpc-3"},
                                      **more}, "site 'x'")


def statuses(*names: str) -> list[dict]:
    """A history as the API gives it: newest first."""
    return [{"status": n, "statusDate": f"2026-01-01T00:00:{i:02d}.000000Z",
             "statusReason": "Completed successfully" if n == "Completed" else None}
            for i, n in reversed(list(enumerate(names)))]


def test_settings_shapes_and_errors() -> None:
    s = settings("https://platform.rescale.jp/")
    assert s.platform == "https://platform.rescale.jp"
    assert s.hardware_body() == {"coresPerSlot": 1, "coreType": {"code": "hpc-3"}}
    assert settings("https://x", core_type_as="string").hardware_body()["coreType"] == "hpc-3"
    assert s.api == {"jobs": "v2", "files": "v2", "clusters": "v3", "coretypes": "v2"}
    assert settings("https://x", api={"jobs": "v3"}).api["jobs"] == "v3"
    with pytest.raises(ConfigError, match="needs a `rescale:` section"):
        check_section(None, "site 'x'")


@pytest.mark.parametrize(("history", "state"), [
    (("Pending",), QUEUED), (("Pending", "Queued"), QUEUED),
    (("Pending", "Queued", "Started", "Validated", "Executing"), RUNNING),
    (("Pending", "Queued", "Executing", "Stopping"), RUNNING),
    (("Pending", "Queued", "Started", "Validated", "Executing", "Completed"), COMPLETED),
    (("Pending", "Executing", "Stopping", "Stopped"), CANCELLED),
    (("Pending", "Something New"), QUEUED),  # unknown: keep waiting, shown as is
])
def test_status_mapping(history: tuple[str, ...], state: str) -> None:
    info = job_info("QvQAo", statuses(*history))
    assert info.native == history[-1] and info.state == state
    assert info.extra["history"] == " → ".join(history)
    assert describe(info).startswith(f"Rescale job QvQAo: {history[-1]}")


def test_submitted_or_not() -> None:
    assert not submitted([]) and not submitted(statuses("Not Started"))
    assert submitted(statuses("Pending"))


def test_multipart_is_streamed_in_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * (3 * CHUNK // 256 + 7)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    body = _Multipart(path, "file", "big.bin")
    pieces = []
    while piece := body.read(CHUNK):
        pieces.append(piece)
    whole = b"".join(pieces)
    assert len(whole) == body.length and max(map(len, pieces)) <= CHUNK
    assert whole.startswith(f"--{body.boundary}\r\n".encode())
    assert b'name="file"; filename="big.bin"' in whole
    assert whole.endswith(f"\r\n--{body.boundary}--\r\n".encode()) and data in whole


def test_pack_keeps_names_and_control_files(tmp_path: Path) -> None:
    import tarfile

    from remote_exec.inputs import check_inputs

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "sub").mkdir()
    (tmp_path / "in" / "sub" / "a.txt").write_text("a")
    (tmp_path / "b.dat").write_text("bb")
    inputs = check_inputs([str(tmp_path / "in"), str(tmp_path / "b.dat")])
    size = pack(tmp_path / "x.tar.gz", {"run.sh": b"echo\n"}, inputs)
    with tarfile.open(tmp_path / "x.tar.gz") as tar:
        assert sorted(tar.getnames()) == [".remote-exec/run.sh", "b.dat", "in/sub/a.txt"]
    assert size == 3
    assert "tar xzf remote-exec-inputs.tar.gz" in COMMAND and ".remote-exec/run.sh" in COMMAND


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory):
    with RescaleSim(tmp_path_factory.mktemp("rescale-unit")) as sim:
        yield sim


def test_upload_and_download_round_trip_in_bounded_memory(sim: RescaleSim,
                                                          tmp_path: Path) -> None:
    api = RescaleApi(settings(sim.url), sim.token, tries=1, max_interval=0.1)
    data = hashlib.sha256(b"seed").digest() * (24 * 1024 * 1024 // 32)  # 24 MiB
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        uploaded = api.upload(path, "big.bin")
        back = tmp_path / "back.bin"
        md5 = api.download(uploaded["id"], back)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert uploaded["decryptedSize"] == len(data) and uploaded["isUploaded"] is True
    assert md5 == uploaded["md5"] == hashlib.md5(data).hexdigest()  # noqa: S324
    assert back.read_bytes() == data
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes: a whole-file buffer?"


def test_paging_follows_next_and_refuses_other_hosts(sim: RescaleSim, tmp_path: Path) -> None:
    api = RescaleApi(settings(sim.url, page_size=2), sim.token, tries=0)
    (tmp_path / "f").write_text("x")
    ids = {api.upload(tmp_path / "f", "f")["id"] for _ in range(3)}
    body = {"name": "n", "jobanalyses": [{"analysis": {"code": "user_included", "version": "0"},
                                          "command": "true", "hardware": {
                                              "coreType": {"code": "hpc-3"},
                                              "coresPerSlot": 1},
                                          "inputFiles": [{"id": i} for i in ids]}]}
    made = [api.create_job(body)["id"] for _ in range(5)]
    listed = [j["id"] for j in api.jobs()]
    assert set(made) <= set(listed) and len(listed) == len(set(listed))
    assert len([r for r in sim.requests if r.path == "/api/v2/jobs/" and r.method == "GET"]) >= 3
    with pytest.raises(ApiError, match="another host"):
        api._same_origin("http://elsewhere.example/api/v2/jobs/?page=2")


def test_refusals(sim: RescaleSim) -> None:
    api = RescaleApi(settings(sim.url), "wrong-key-xyz", tries=0)
    with pytest.raises(AuthError, match="refused the API key") as err:
        list(api.jobs())
    assert "wrong-key-xyz" not in str(err.value)
    bad = dict(name="n", jobanalyses=[{"analysis": {"code": "user_included", "version": "0"},
                                        "command": "true", "inputFiles": [{"id": "nope"}],
                                        "hardware": {"coreType": "hpc-3", "coresPerSlot": 1}}])
    good = RescaleApi(settings(sim.url), sim.token, tries=0)
    with pytest.raises(Exception, match="unexpected answer 400"):
        good.create_job(bad)
    sim.faults.burst_5xx = 1
    with pytest.raises(ApiError, match="keeps failing") as failing:
        list(good.jobs())
    assert failing.value.transient


def test_key_from_either_variable_or_a_private_file(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    from remote_exec import redact
    from remote_exec.backends.rescale.client import load_token

    for name in ("REMOTE_EXEC_RESCALE_TOKEN", "RESCALE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    key = tmp_path / "key"
    key.write_text("from-the-file-123\n")
    key.chmod(0o600)
    s = settings("https://x", token_file=str(key))
    assert load_token(s, "x") == "from-the-file-123"
    monkeypatch.setenv("RESCALE_API_TOKEN", "seed-variable-456")  # seed 004's name
    assert load_token(s, "x") == "seed-variable-456"
    monkeypatch.setenv("REMOTE_EXEC_RESCALE_TOKEN", "ours-first-789")
    assert load_token(s, "x") == "ours-first-789"
    assert redact.redact("key ours-first-789 here") == "key *** here"
    for name in ("REMOTE_EXEC_RESCALE_TOKEN", "RESCALE_API_TOKEN"):
        monkeypatch.delenv(name)
    with pytest.raises(AuthError, match="no Rescale API key"):
        load_token(settings("https://x"), "x")
