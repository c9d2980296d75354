"""One way to wait: every retry and every poll loop draws its delays from a :class:`Backoff`.

A backoff is data (first delay, growth factor, ceiling, jitter); the policies the
project uses are named here, each once, so a reader finds in one place how often
remote-exec reconnects, asks sshd for a handshake again, or polls a run, a job or
a sync:

    for delay in POLL.delays():
        if done():
            break
        await asyncio.sleep(delay)
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Backoff:
    """Delays that start at ``first`` and grow by ``factor`` up to ``ceiling`` seconds.

    With ``jitter`` j, each delay is drawn uniformly from ``[d * (1 - j), d]``, so many
    clients retrying at once spread out instead of knocking together."""

    first: float
    factor: float = 2.0
    ceiling: float = 60.0
    jitter: float = 0.0

    def delay(self, attempt: int) -> float:
        """The delay before retry ``attempt`` (0-based)."""
        base = min(self.ceiling, self.first * self.factor ** min(attempt, 64))
        if not self.jitter:
            return base
        return base * random.uniform(1.0 - self.jitter, 1.0)  # noqa: S311 - not crypto

    def delays(self) -> Iterator[float]:
        """The delays of one wait, without end (the caller decides when to stop)."""
        attempt = 0
        while True:
            yield self.delay(attempt)
            attempt += 1

    def capped(self, ceiling: float) -> Backoff:
        """The same policy with another ceiling (a site's or a service's own)."""
        return replace(self, ceiling=ceiling)


#: reopening a run's dropped connection: 1 s doubling to the site's retry_max_interval
RECONNECT = Backoff(first=1.0, factor=2.0, ceiling=60.0, jitter=0.5)
#: another handshake after sshd dropped one before authentication (MaxStartups)
HANDSHAKE = Backoff(first=0.2, factor=2.0, ceiling=5.0, jitter=0.5)
#: a free handshake slot (another process holds all of them)
SLOT = Backoff(first=0.05, factor=1.0, ceiling=0.05, jitter=0.8)
#: a channel sshd refused on an open connection (MaxSessions): until another run's ends
CHANNEL = Backoff(first=1.0, factor=2.0, ceiling=8.0, jitter=0.5)
#: a run's exit-code file, an earlier attempt's answer, a scheduler's view of a job
POLL = Backoff(first=0.2, factor=1.5, ceiling=5.0)
#: asking a batch scheduler about a job (it is a shared service: less often)
QUERY = Backoff(first=1.0, factor=1.5, ceiling=30.0)
#: a web API's job or sync (a remote service; the site may set its own ceiling)
REMOTE_POLL = Backoff(first=0.5, factor=1.5, ceiling=30.0)
#: a web API request answered 5xx or not at all
REQUEST_RETRY = Backoff(first=0.5, factor=2.0, ceiling=60.0, jitter=0.5)
#: a new journal's switch to WAL while another process holds it (SQLite does not wait
#: for that lock itself): about 20 s in all before the error
JOURNAL_BUSY = Backoff(first=0.05, factor=1.5, ceiling=1.0, jitter=0.5)
JOURNAL_BUSY_TRIES = 30
