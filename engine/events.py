"""The in-process event bus.  The engine publishes one ``Event`` per history
entry, only after the transition that wrote it is committed (write, then
announce).  Notifiers subscribe; they never poll.  Each subscriber gets the
events in order, through its own queue, so a slow one delays nobody else."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """One transition of one instance, as written to its history."""

    instance_id: int
    process: str
    at: float
    path: str           # the step's position ("" for the instance itself)
    step: str           # the step's name as people see it
    event: str          # launched, dispatched, pending, done, error, failed, timed out,
                        # timer <name>, completed, terminated, cancelled, retried, ...
    actor: str = ""
    detail: str = ""
    project: str | None = None      # the instance's project (routing); not stored in the history row


Subscriber = Callable[[Event], Awaitable[None]]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[tuple[Subscriber, frozenset[str] | None, asyncio.Queue[Event]]] = []
        self._tasks: list[asyncio.Task[None]] = []

    def subscribe(self, handler: Subscriber, events: Iterable[str] | None = None) -> None:
        """Call ``handler`` for every event (or only those named in ``events``)."""
        q: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers.append((handler, frozenset(events) if events else None, q))
        self._tasks.append(asyncio.get_running_loop().create_task(self._pump(handler, q)))

    def publish(self, events: Iterable[Event]) -> None:
        if not self._subscribers:
            return
        for event in events:
            for _handler, wanted, q in self._subscribers:
                if wanted is None or event.event in wanted:
                    q.put_nowait(event)

    async def _pump(self, handler: Subscriber, q: asyncio.Queue[Event]) -> None:
        while True:
            event = await q.get()
            try:
                await handler(event)
            except Exception:
                log.exception("event subscriber %r failed on %s of #%d", handler, event.event, event.instance_id)
            finally:
                q.task_done()

    async def drain(self) -> None:
        """Wait until every subscriber has seen every published event."""
        for _h, _w, q in self._subscribers:
            await q.join()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._subscribers.clear()
