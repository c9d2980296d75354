"""The journal's writer thread: writes keep their order, and a slow one does not hold
up the event loop that asked for it."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from remote_exec.journal import Journal, opened

RUN = "0123456789abcdef"


@pytest.fixture
def journal(tmp_path: Path):
    journal = Journal(tmp_path / "journal.sqlite")
    journal.create(run_id=RUN, site="loop", host="127.0.0.1", label="t", backend="direct",
                   into_dir=str(tmp_path), request={"x": 1}, driver_pid=1)
    yield journal
    journal.close()


def slow_writes(monkeypatch: pytest.MonkeyPatch, journal: Journal, seconds: float) -> list:
    """Make every write sleep ``seconds`` first; returns the threads the writes ran on."""
    threads: list = []
    for name in ("_update", "_event"):
        original = getattr(journal, name)

        def slow(*args, _original=original):
            threads.append(threading.current_thread())
            time.sleep(seconds)
            return _original(*args)

        monkeypatch.setattr(journal, name, slow)
    return threads


def test_writes_keep_the_order_they_were_asked_in(journal: Journal):
    async def main() -> None:
        journal.event_soon(RUN, "a", "1")
        await journal.aevent(RUN, "b", "2")
        journal.event_soon(RUN, "c", "3")
        journal.event(RUN, "d", "4")  # a synchronous write waits for those queued before
        journal.event_soon(RUN, "e", "5")
        await journal.aupdate(RUN, phase="staged")
        journal.event_soon(RUN, "f", "6")
        await journal.aupdate(RUN, phase="launched", state="succeeded")

    asyncio.run(main())
    journal.flush()
    assert [kind for _at, kind, _message in journal.events(RUN)] == list("abcdef")
    record = journal.get(RUN)
    assert record is not None
    assert (record.phase, record.state) == ("launched", "succeeded")
    assert record.launched_at and record.ended_at


def test_a_slow_write_does_not_stall_the_event_loop(journal: Journal, monkeypatch):
    threads = slow_writes(monkeypatch, journal, 0.5)

    async def main() -> tuple[int, float, float]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        await asyncio.sleep(0.05)
        start = time.monotonic()
        journal.event_soon(RUN, "queued", "x")  # returns at once
        queued = time.monotonic() - start
        ticks = 0
        await journal.aupdate(RUN, phase="staged")  # behind the queued event: ~1 s
        waited = time.monotonic() - start
        ticker.cancel()
        return ticks, queued, waited

    ticks, queued, waited = asyncio.run(main())
    assert queued < 0.1
    assert waited >= 1.0
    assert ticks >= 30, f"the loop ran {ticks} times in {waited:.2f} s"  # ~100 if free
    assert threads and all(t is not threading.main_thread() for t in threads)
    assert len({t.ident for t in threads}) == 1  # one writer thread
    record = journal.get(RUN)
    assert record is not None and record.phase == "staged"


def test_close_waits_for_queued_events(tmp_path: Path, monkeypatch):
    journal = Journal(tmp_path / "journal.sqlite")
    slow_writes(monkeypatch, journal, 0.05)
    for i in range(10):
        journal.event_soon(RUN, "progress", str(i))
    journal.close()
    with opened(tmp_path / "journal.sqlite") as again:
        assert [m for _at, _kind, m in again.events(RUN)] == [str(i) for i in range(10)]


def test_a_cancelled_waiter_does_not_lose_its_write(journal: Journal, monkeypatch):
    slow_writes(monkeypatch, journal, 0.3)

    async def main() -> None:
        task = asyncio.ensure_future(journal.aupdate(RUN, state="interrupted"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    journal.flush()
    record = journal.get(RUN)
    assert record is not None and record.state == "interrupted"


def test_an_unknown_column_fails_in_the_caller(journal: Journal):
    with pytest.raises(ValueError, match="unknown journal columns"):
        asyncio.run(journal.aupdate(RUN, colour="blue"))
    with pytest.raises(ValueError, match="unknown journal columns"):
        journal.update(RUN, colour="blue")


def test_a_failed_queued_event_is_logged_not_raised(journal: Journal, monkeypatch, caplog):
    def broken(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(journal, "_event", broken)
    journal.event_soon(RUN, "x", "y")
    journal.flush()
    assert "disk full" in caplog.text


def test_open_and_close_from_a_loop(tmp_path: Path, monkeypatch):
    async def main() -> list:
        journal = await Journal.aopen(tmp_path / "journal.sqlite")
        slow_writes(monkeypatch, journal, 0.2)
        journal.event_soon(RUN, "last", "words")
        await journal.aclose()  # waits for the queued event, in a thread
        with opened(tmp_path / "journal.sqlite") as again:
            return again.events(RUN)

    assert [kind for _at, kind, _m in asyncio.run(main())] == ["last"]
