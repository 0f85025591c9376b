"""Connection plumbing shared by the chat front-ends: what counts as a
loopback host, and the reconnect backoff."""
from __future__ import annotations

import ipaddress
import random
from typing import Callable

#: A connection that stayed up this long resets the backoff: the outage it
#: followed is over, and the next loss is a new one that starts at the minimum.
HEALTHY_AFTER = 60.0


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ``::1``, ``[::1]``):
    traffic that never leaves the machine.  Names are not resolved: a name that
    merely resolves to 127.0.0.1 today does not count."""
    name = host.strip().rstrip(".").lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Backoff:
    """Reconnect delays: ``minimum`` doubling per failed attempt up to
    ``maximum``, with "equal jitter" (half fixed, half random: never 0, and
    bots restarted together do not reconnect in lockstep).  A connection that
    stayed up ``healthy_after`` seconds starts the next round at the minimum."""

    def __init__(self, minimum: float, maximum: float, *, rng: Callable[[], float] = random.random,
                 healthy_after: float = HEALTHY_AFTER) -> None:
        if not 0 < minimum <= maximum:
            raise ValueError("need 0 < minimum <= maximum")
        self.minimum = minimum
        self.maximum = maximum
        self.healthy_after = healthy_after
        self._rng = rng
        self.attempt = 0

    def delay(self) -> float:
        """The wait before the next attempt; each call counts one more failure."""
        cap: float = min(self.maximum, self.minimum * 2.0 ** min(self.attempt, 30))
        self.attempt += 1
        return cap / 2 + self._rng() * cap / 2

    def connection_ended(self, lasted: float) -> None:
        """A connection that was made is gone after ``lasted`` seconds."""
        if lasted >= self.healthy_after:
            self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0
