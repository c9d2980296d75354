"""The one backoff type every retry and poll loop draws its delays from."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from remote_exec.backoff import POLL, RECONNECT, Backoff


def test_delays_grow_by_the_factor_up_to_the_ceiling() -> None:
    policy = Backoff(first=0.5, factor=2.0, ceiling=3.0)
    assert list(itertools.islice(policy.delays(), 5)) == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.delay(10_000) == 3.0  # no overflow for a long wait


def test_jitter_stays_within_its_band() -> None:
    policy = RECONNECT.capped(8.0)
    for attempt in range(8):
        ceiling = min(8.0, 2.0 ** attempt)
        for _ in range(50):
            assert ceiling * 0.5 <= policy.delay(attempt) <= ceiling


def test_polls_have_no_jitter_and_a_low_ceiling() -> None:
    assert list(itertools.islice(POLL.delays(), 2)) == [0.2, 0.2 * 1.5]
    assert max(itertools.islice(POLL.delays(), 100)) == POLL.ceiling


def test_no_other_module_draws_its_own_delays() -> None:
    """Jitter and growth live in remote_exec/backoff.py only (one policy per wait)."""
    package = Path(__file__).resolve().parent.parent / "remote_exec"
    own = re.compile(r"random\.(uniform|random)\(|interval \* \d|\* 2 \*\* attempt")
    offenders = [f"{path.relative_to(package)}:{n}" for path in package.rglob("*.py")
                 if path.name != "backoff.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if own.search(line)]
    assert offenders == []
