"""Receipts: the future ``send`` returns, settled by what the server says.

One ``send`` may travel as several message stanzas (long text is split; a
person may have several JIDs).  Its ``Receipt`` counts the stanzas the server
has not yet confirmed and settles its future once:

* resolved when the last one is confirmed (the XEP-0198 ack, or the answer
  to a ping written after it on a stream without stream management);
* failed with ``Undeliverable`` or ``NotDelivered`` when one of them bounces
  with an error before that, when its target goes away, or at ``close``.

A settled receipt stays settled: later news about its stanzas (a bounce that
arrives after the ack) is only logged.  Receipts are created already
"retrieved", so one that fails with nobody awaiting it (a chat answer)
produces no "exception was never retrieved" noise.
"""
from __future__ import annotations

import asyncio

from bot.chat import NotDelivered, TransportError, Undeliverable


def quiet_future() -> asyncio.Future[None]:
    """A future whose failure is fine to leave unawaited."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.add_done_callback(_retrieve)
    return future


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def settled(error: TransportError | None = None) -> asyncio.Future[None]:
    """A receipt that is already settled: resolved, or failed with ``error``."""
    future = quiet_future()
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
    return future


class Receipt:
    """The stanzas of one ``send`` and the future their confirmation settles."""

    def __init__(self) -> None:
        self.future = quiet_future()
        self.ids: list[str] = []          # every stanza id it covers, for forgetting them when settled
        self.open = 0                     # stanzas not yet confirmed

    @property
    def done(self) -> bool:
        """Settled, or cancelled by its holder (who gave up on it: the rest is not sent)."""
        return self.future.done()

    def add(self, stanza_id: str) -> None:
        self.ids.append(stanza_id)
        self.open += 1

    def confirmed(self) -> bool:
        """One of its stanzas is confirmed; True if that settled the receipt."""
        self.open -= 1
        if self.open <= 0 and not self.future.done():
            self.future.set_result(None)
            return True
        return False

    def fail(self, error: NotDelivered | Undeliverable) -> bool:
        """Fail it, unless it is settled already; True if this failed it."""
        if self.future.done():
            return False
        self.future.set_exception(error)
        return True
