"""Receipts: the future ``send`` returns, settled by what the server says
about the message's lines (``delivery`` says when that is).

A message may travel as several lines (its text has several, or a long one
is cut to fit 512 bytes).  Its ``Receipt`` counts the lines the server has
not yet confirmed, and settles its future once:

* resolved when the last one is confirmed;
* failed with ``Undeliverable`` or ``NotDelivered`` as soon as one of them is
  refused by the server, dropped (its person gone, its channel left) or
  still open at ``close``; the rest of a failed message is not sent;
* failed with ``Undeliverable`` once the last line is confirmed if the cap
  left some out (``cut``): the reader saw the cut, the message is not whole.

A settled receipt stays settled.  Futures are created already "retrieved",
so one that fails with nobody awaiting it (a command's answer) produces no
"exception was never retrieved" noise.
"""
from __future__ import annotations

import asyncio

from bot.chat import NotDelivered, Undeliverable


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class Receipt:
    """The lines of one ``send`` and the future their confirmation settles."""

    def __init__(self, person: str | None = None) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.future.add_done_callback(_retrieve)
        self.open = 0                     # lines neither confirmed nor left out yet
        self.cut: str | None = None       # why some lines were left out by the cap (then it fails at the end)
        self.person = person              # a Person target's users.yaml name: how "offline" reads

    @property
    def done(self) -> bool:
        """Settled, or cancelled by its holder (who gave up on it: the rest is not sent)."""
        return self.future.done()

    def add(self, lines: int = 1) -> None:
        self.open += lines

    def confirmed(self) -> None:
        """One of its lines is confirmed (or left out by the cap: ``cut`` says so)."""
        self.open -= 1
        if self.open <= 0 and not self.future.done():
            if self.cut is not None:
                self.future.set_exception(Undeliverable(self.cut))
            else:
                self.future.set_result(None)

    def fail(self, error: NotDelivered | Undeliverable) -> None:
        """Fail it, unless it is settled already."""
        if not self.future.done():
            self.future.set_exception(error)
