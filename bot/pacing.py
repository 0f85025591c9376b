"""Rate limits with the clock passed in: an outbound token bucket per
connection and inbound command cooldowns per user."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

Clock = Callable[[], float]


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second.  ``available()`` says
    how many there are now, ``delay()`` how long to wait for the next one (or
    for ``needed``), ``take()`` spends one."""

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def available(self) -> float:
        """Tokens there now (fractions included; below 0 after a forced take)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        return self._tokens

    def delay(self, needed: float = 1.0) -> float:
        tokens = self.available()
        return 0.0 if tokens >= needed else (needed - tokens) / self.rate

    def take(self) -> None:
        self.available()
        self._tokens -= 1


@dataclass
class Cooldown:
    """At most ``limit`` commands per ``window`` seconds per key (a user).

    A user over the limit is told so once per window; the commands they keep
    sending meanwhile are dropped without an answer, so a flood of commands
    cannot turn into a flood of refusals (which the bot would then have to
    pace out to the whole channel)."""

    MAX_KEYS = 4096

    limit: int
    window: float
    clock: Clock = time.monotonic
    _hits: dict[str, list[float]] = field(default_factory=dict)
    _refused: dict[str, float] = field(default_factory=dict)

    def admit(self, key: str) -> str:
        """``"ok"`` (counted), ``"refuse"`` (say so) or ``"quiet"`` (already told)."""
        now = self.clock()
        if len(self._hits) > self.MAX_KEYS:            # forget senders whose window has passed
            self._hits = {k: v for k, v in self._hits.items() if v and now - v[-1] < self.window}
            self._refused = {k: t for k, t in self._refused.items() if now - t < self.window}
        hits = [t for t in self._hits.get(key, ()) if now - t < self.window]
        self._hits[key] = hits
        if len(hits) < self.limit:
            hits.append(now)
            self._refused.pop(key, None)
            return "ok"
        told = self._refused.get(key)
        if told is not None and now - told < self.window:
            return "quiet"
        self._refused[key] = now
        return "refuse"
