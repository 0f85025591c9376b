"""Fair outbound queues: one user's long answer never holds up everyone else.

A front-end keeps one ``FairQueue`` per connection.  Lines are queued per
target (a channel, a room, a person) and taken round-robin between targets,
so a one-line answer waits behind at most one line per other target that has
lines waiting.  What one target may have queued is capped: the lines of an
answer beyond the cap are replaced by one note saying how many were left
out, instead of being queued without bound (at 1 line/s, 255 queued lines
are four minutes of one person's output).  A target that goes away (a user
who quits, a channel the bot left) is dropped with everything queued for it.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Callable, Generic, Hashable, Iterator, TypeVar

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

#: Lines one target may have queued by default.  ``ps all`` (50 instances and a
#: summary line) fits whole; two such answers at once do not.
DEFAULT_MAX_PER_TARGET = 60


def overflow_note(left_out: int) -> str:
    return f"... {left_out} more line(s) not sent; use show/history with an id for less"


class FairQueue(Generic[K, T]):
    """Round-robin between targets; at most ``max_per_target`` lines each."""

    def __init__(self, max_per_target: int = DEFAULT_MAX_PER_TARGET) -> None:
        if max_per_target < 2:
            raise ValueError("max_per_target must be at least 2 (a line and the overflow note)")
        self.max_per_target = max_per_target
        self._queues: OrderedDict[K, deque[T]] = OrderedDict()   # next target to serve first
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def __bool__(self) -> bool:
        return self._length > 0

    def targets(self) -> list[K]:
        return list(self._queues)

    def queued(self, target: K) -> int:
        return len(self._queues.get(target, ()))

    def put(self, target: K, items: list[T], note: Callable[[int], T]) -> int:
        """Queue ``items`` for ``target``; returns how many were left out.  When
        they do not all fit, as many as fit are queued, followed by
        ``note(left_out)`` in place of the rest."""
        queue = self._queues.get(target)
        if queue is None:
            queue = self._queues[target] = deque()
        room = self.max_per_target - len(queue)
        left_out = 0
        if len(items) > room:
            keep = max(room - 1, 0)
            left_out = len(items) - keep
            items = [*items[:keep], note(left_out)] if room >= 1 else []
        queue.extend(items)
        self._length += len(items)
        if not queue:
            del self._queues[target]
        return left_out

    def head(self) -> tuple[K, T] | None:
        """The next line to send (its target first in turn), without taking it."""
        for target, queue in self._queues.items():
            return target, queue[0]
        return None

    def pop(self) -> tuple[K, T]:
        """Take the next line; its target goes to the back of the round."""
        target, queue = next(iter(self._queues.items()))
        item = queue.popleft()
        self._length -= 1
        if queue:
            self._queues.move_to_end(target)
        else:
            del self._queues[target]
        return target, item

    def requeue(self, items: list[tuple[K, T]]) -> None:
        """Lines that must go out again first, in order (unconfirmed after a
        reconnect); the cap does not apply to them: they were admitted once."""
        for target, item in reversed(items):
            queue = self._queues.get(target)
            if queue is None:
                queue = self._queues[target] = deque()
            queue.appendleft(item)
            self._queues.move_to_end(target, last=False)
            self._length += 1

    def drop(self, target: K) -> int:
        """Forget everything queued for ``target``; returns how many lines."""
        queue = self._queues.pop(target, None)
        if not queue:
            return 0
        self._length -= len(queue)
        return len(queue)

    def drop_where(self, condition: Callable[[K], bool]) -> int:
        dropped = 0
        for target in [t for t in self._queues if condition(t)]:
            dropped += self.drop(target)
        return dropped

    def rename(self, old: K, new: K) -> None:
        """A target changed its name (an IRC nick change): its lines follow it."""
        queue = self._queues.pop(old, None)
        if queue is None:
            return
        existing = self._queues.get(new)
        if existing is not None:
            existing.extend(queue)
        else:
            self._queues[new] = queue

    def __iter__(self) -> Iterator[tuple[K, T]]:
        for target, queue in self._queues.items():
            for item in queue:
                yield target, item
