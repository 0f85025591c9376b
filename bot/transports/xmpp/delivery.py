"""Outbound delivery: a fair, capped queue per target, paced, confirmed by the
server, sent again after a new session, and a receipt for every ``put``.

What a receipt means here (``receipts`` has the mechanics):

* ``put`` only queues, and returns the receipt.  A message leaves the queue
  only while a session is up and every configured room has been (re)joined
  (``online``), paced by a token bucket, round-robin between targets (a
  room, a JID, an occupant ``room/nick``): a one-line answer to one person
  waits behind at most one message per other target, never behind someone
  else's long output.
* The receipt resolves once the server has confirmed every stanza of the
  message: with XEP-0198 stream management (Prosody's ``smacks``) by its
  ack, which we request after each batch we write; without it, by the
  answer to a XEP-0199 ping to the server written after the batch.  A server
  handles one stream's stanzas in order, so either answer means it has
  taken each earlier stanza on: delivered it, stored it offline, or bounced
  it (the bounce is written to us before the answer).  "Confirmed" means the
  server has it, not that a human read it.
* A bounce (an error stanza with the message's id, from the address it went
  to) that arrives before the receipt resolved fails it: ``NotDelivered`` for
  an error of type ``wait``, else ``Undeliverable``, with the condition and
  the server's text; the rest of that message is not sent.  A bounce that
  arrives after (a remote server refusing later) is only logged: the receipt
  stays resolved.
* A stanza unconfirmed when the stream dies is sent again: by slixmpp when
  the stream is resumed, by us (at the head of its target's queue, in order)
  when a new session has to be started (the server restarted).  Its receipt
  resolves when the new copy is confirmed.  So a message is delivered at
  least once while the bot runs, and at most 1 + (the number of streams lost
  while it was unconfirmed) times: a copy the server took on just before
  the stream died, without our hearing of it, is delivered again.
  Messages queued while disconnected are delivered exactly once, in order.
* Each target may have ``max_queued_lines`` lines of text queued (lines as
  split at ``max_line_chars``, however they are packed into messages): the
  lines beyond that are replaced by one note saying how many were left out,
  so a person reading sees the cut.  The receipt then fails at once, since
  the message was not delivered whole: ``NotDelivered`` if it would fit once
  the target's queue has drained, ``Undeliverable`` if it is longer than the
  cap itself.  A target that is gone (a room the bot left: ``NotDelivered``,
  it rejoins with the next session; an occupant who left: ``Undeliverable``)
  is dropped with everything queued for it.
* ``close`` fails every receipt still open with ``NotDelivered``.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from bot.chat import NotDelivered, Undeliverable
from bot.logsafety import sanitise
from bot.outqueue import FairQueue, overflow_note
from bot.pacing import TokenBucket
from bot.transports.xmpp.config import XmppConfig
from bot.transports.xmpp.receipts import Receipt
from bot.transports.xmpp.text import pack, split_lines

log = logging.getLogger(__name__)

Key = tuple[str, str]          # (to, message type): ("ops@conference.example.org", "groupchat")
SENT_IDS_REMEMBERED = 500      # our own room messages, to recognise them reflected back
CONFIRM_TIMEOUT = 30.0         # seconds for the server to answer a confirming ping


@dataclass
class OutMessage:
    """One outbound chat message (one or more lines of text), with the stanza
    currently carrying it and the receipt it counts towards."""

    to: str
    mtype: str                 # "chat" | "groupchat"
    body: str
    lines: int                 # lines of text in it, for the per-target cap
    receipt: Receipt
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    stanza: Any = None

    @property
    def key(self) -> Key:
        return self.to, self.mtype


class Delivery:
    """The outbound queue of one XMPP account; ``pump`` runs as long as it does."""

    def __init__(self, config: XmppConfig, online: asyncio.Event) -> None:
        self.network = config.name
        self.max_line_chars = config.max_line_chars
        self.online = online
        self.client: Any = None
        # Lines, not messages, are capped; a message holds at least one line, so the
        # queue's own per-target cap (in messages) never cuts before ours does.
        self.queue: FairQueue[Key, OutMessage] = FairQueue(config.max_queued_lines)
        self.inflight: dict[str, OutMessage] = {}   # handed to slixmpp, not yet confirmed
        self._open: dict[str, OutMessage] = {}      # every part of an unsettled receipt, by stanza id
        self._unpinged: list[tuple[OutMessage, Any]] = []   # written without SM, awaiting a ping
        self._bucket = TokenBucket(config.rate, config.burst)
        self._wakeup = asyncio.Event()
        self._requeued: set[str] = set()         # ids of messages queued again after a dead session
        self._sent_ids: collections.deque[str] = collections.deque(maxlen=SENT_IDS_REMEMBERED)
        self._sent_set: set[str] = set()
        self._ack_timer: asyncio.Handle | None = None
        self._ping_timer: asyncio.Handle | None = None
        self._ack_answer: asyncio.Handle | None = None

    @property
    def undelivered(self) -> int:
        """Messages queued or sent but not yet confirmed by the server."""
        return len(self.queue) + len(self.inflight)

    def wake(self) -> None:
        self._wakeup.set()

    # --- queueing --------------------------------------------------------------------

    def put(self, to: str, mtype: str, text: str) -> asyncio.Future[None]:
        """Queue ``text`` for ``to``; returns its receipt."""
        return self.put_all((to,), mtype, text)

    def put_all(self, addresses: Iterable[str], mtype: str, text: str) -> asyncio.Future[None]:
        """Queue ``text`` for each address (a person's JIDs): its lines packed
        into as few messages as ``max_line_chars`` allows, within each
        target's cap.  One receipt covers every stanza."""
        receipt = self._receipt()
        lines = split_lines(text, self.max_line_chars)
        room = {to: self.queue.max_per_target - sum(m.lines for k, m in self.queue if k == (to, mtype))
                for to in addresses}
        short = [to for to in room if len(lines) > room[to]]
        # A message cut at the cap is still sent, ending in a note that shows the
        # cut to whoever reads it; its receipt fails, as it was not delivered whole.
        carrier = self._receipt() if short else receipt
        for to in room:
            self._queue_lines(to, mtype, lines, room[to], carrier)
        if short:
            cap = self.queue.max_per_target
            receipt.fail(Undeliverable(f"xmpp {self.network}: {len(lines)} lines: more than max_queued_lines "
                                       f"({cap})") if len(lines) > cap else
                         NotDelivered(f"xmpp {self.network}: too many lines queued for {sanitise(short[0])} "
                                      f"(max_queued_lines {cap}); try again later"))
        elif receipt.open == 0:
            receipt.confirmed()         # no text: nothing to confirm
        self._wakeup.set()
        return receipt.future

    def _queue_lines(self, to: str, mtype: str, lines: list[str], room: int, receipt: Receipt) -> None:
        """Queue ``lines`` for one target that has ``room`` lines left under its
        cap; the lines beyond that are replaced by a note."""
        key = (to, mtype)
        if lines and len(lines) > room:
            keep = max(room - 1, 0)
            left_out = len(lines) - keep
            lines = [*lines[:keep], overflow_note(left_out)] if room >= 1 else []
            log.warning("xmpp %s: %d line(s) to %s left out: more than max_queued_lines (%d) queued for it",
                        self.network, left_out, sanitise(to), self.queue.max_per_target)
        messages = [OutMessage(to, mtype, body, body.count("\n") + 1, receipt)
                    for body in pack(lines, self.max_line_chars)]
        for message in messages:
            receipt.add(message.id)
            self._open[message.id] = message
        # The queue's own cap (in messages) never cuts before ours (in lines) does.
        self.queue.put(key, messages, lambda n: OutMessage(to, mtype, overflow_note(n), 1, receipt))

    def drop_room(self, room: str) -> int:
        """Forget what is queued for ``room`` and its occupants (``room/nick``);
        the bot is not in it (it tries again with the next session)."""
        return self._drop(lambda key: key[0] == room or key[0].startswith(room + "/"),
                          lambda to: NotDelivered(f"xmpp {self.network}: not in {to.split('/')[0]} now"))

    def drop_occupant(self, room: str, nick: str) -> int:
        occupant = (f"{room}/{nick}", "chat")
        return self._drop(lambda key: key == occupant, self._left)

    def rename_occupant(self, room: str, old: str, new: str) -> None:
        """An occupant changed nick: output queued for them follows them."""
        old_key, new_key = (f"{room}/{old}", "chat"), (f"{room}/{new}", "chat")
        for key, message in self.queue:
            if key == old_key:
                message.to = new_key[0]
        self.queue.rename(old_key, new_key)

    def keep_occupants(self, room: str, present: set[str]) -> int:
        """After a rejoin: forget output for occupants who left while we were away."""
        prefix = room + "/"
        return self._drop(lambda key: key[1] == "chat" and key[0].startswith(prefix)
                          and key[0][len(prefix):] not in present, self._left)

    def _left(self, to: str) -> Undeliverable:
        # never re-addressed: whoever holds that nick later is someone else
        return Undeliverable(f"xmpp {self.network}: {sanitise(to)} left the room")

    def _drop(self, condition: Callable[[Key], bool],
              error: Callable[[str], NotDelivered | Undeliverable]) -> int:
        for key, message in self.queue:
            if condition(key):
                self._requeued.discard(message.id)
                message.receipt.fail(error(message.to))
        return self.queue.drop_where(condition)

    # --- sending ------------------------------------------------------------------------

    async def pump(self) -> None:
        while True:
            if not (self.online.is_set() and self.queue):
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self.queue.head()
            if head is not None and head[1].receipt.done:
                self.queue.pop()            # failed (or given up on): the rest of it is not sent
                self._requeued.discard(head[1].id)
                continue
            delay = self._bucket.delay()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            _key, message = self.queue.pop()
            self._requeued.discard(message.id)
            self._bucket.take()
            try:
                msg = self.client.make_message(mto=message.to, mbody=message.body, mtype=message.mtype)
            except Exception as exc:   # e.g. an invalid JID in a target: fail that message, not the pump
                log.warning("xmpp %s: cannot send to %s: %s", self.network, sanitise(message.to), exc)
                message.receipt.fail(Undeliverable(f"xmpp {self.network}: cannot send to "
                                                          f"{sanitise(message.to)}: {sanitise(str(exc))}"))
                continue
            msg["id"] = message.id
            message.stanza = msg
            self.inflight[message.id] = message
            if message.mtype == "groupchat":
                self._remember_sent(message.id)
            self.client.send(msg)
            log.debug("xmpp %s: -> %s: %s", self.network, message.to, sanitise(message.body))

    def outgoing(self, stanza: Any) -> Any:
        """slixmpp's ``out_sync`` filter: runs just before a stanza is written
        (after xep_0198 counted it)."""
        message = self.inflight.get(stanza["id"]) if stanza.name == "message" else None
        if message is None:
            if stanza.name == "message" and stanza["id"] in self._requeued:
                return None     # a copy from a dead session: the message is queued again
            return stanza
        if message.stanza is not stanza:
            return None
        if message.receipt.done:
            del self.inflight[message.id]       # it failed meanwhile (a bounce): not written
            return None
        if self.client.transport is None:
            return None         # the session died: the message stays in flight and is requeued
        loop = asyncio.get_running_loop()
        # Ask the server to confirm what we wrote, once per batch: the call runs
        # after this pass of slixmpp's send loop has written it.
        if self.client.plugin["xep_0198"].enabled_out:
            if self._ack_timer is None:
                self._ack_timer = loop.call_soon(self._request_ack)
        else:
            self._unpinged.append((message, stanza))
            if self._ping_timer is None:
                self._ping_timer = loop.call_soon(self._request_ping)
        return stanza

    def _request_ack(self) -> None:
        self._ack_timer = None
        client = self.client
        if client is not None and client.transport is not None and client.plugin["xep_0198"].enabled_out:
            client.plugin["xep_0198"].request_ack()

    def _request_ping(self) -> None:
        """No stream management: a ping to the server, written after the batch,
        confirms the batch when it is answered (with a result or an error)."""
        self._ping_timer = None
        batch, self._unpinged = self._unpinged, []
        client = self.client
        if not batch or client is None or client.transport is None:
            return              # the session died: the batch is in flight and will be requeued
        transport = client.transport
        try:
            answer = client.plugin["xep_0199"].send_ping(client.boundjid.host, timeout=CONFIRM_TIMEOUT)
        except Exception as exc:   # e.g. the session died meanwhile: the batch is requeued
            log.debug("xmpp %s: confirming ping: %r", self.network, exc)
            return
        answer.add_done_callback(lambda done: self._pinged(done, batch, transport))

    def _pinged(self, answer: asyncio.Future[Any], batch: list[tuple[OutMessage, Any]], transport: Any) -> None:
        from slixmpp.exceptions import IqTimeout

        if answer.cancelled():
            return              # the session ended: the batch is requeued
        if isinstance(answer.exception(), IqTimeout):
            client = self.client
            if client is not None and client.transport is transport:
                log.warning("xmpp %s: no answer to the ping confirming %d message(s); dropping the "
                            "connection (they are sent again after reconnecting)", self.network, len(batch))
                client.abort()
            return
        for message, stanza in batch:            # an error answer is an answer too
            if self.inflight.get(message.id) is message and message.stanza is stanza:
                del self.inflight[message.id]
                message.receipt.confirmed()

    def acked(self, stanza: Any) -> None:
        """slixmpp's ``stanza_acked``: the server has this one."""
        message = self.inflight.get(stanza["id"])
        if message is not None and message.stanza is stanza:
            del self.inflight[message.id]
            message.receipt.confirmed()
        if self._ack_answer is None:
            self._ack_answer = asyncio.get_running_loop().call_soon(self._answer_ack)

    def _answer_ack(self) -> None:
        """Answer the server's ack with one byte of whitespace (allowed between
        stanzas).  Otherwise the ack is data nobody answers: our kernel delays
        its TCP ACK by ~40 ms and the server's Nagle holds its next stanza to us
        (the next command) until then, adding ~40 ms to every round trip."""
        self._ack_answer = None
        client = self.client
        if client is not None and client.transport is not None:
            client.send_raw(" ")

    def bounced(self, msg_id: str, sender: str, condition: str, text: str, etype: str) -> None:
        """An error stanza came back for ``msg_id`` from ``sender`` (normalised
        full JID).  It counts only from where the message went (the room, the
        JID, or the bare JID of a full JID we wrote to) and only while its
        receipt is open; anything else is logged."""
        why = sanitise(condition + (f" ({text})" if text else ""))
        message = self._open.get(msg_id)
        if message is None or message.receipt.done:
            log.warning("xmpp %s: %s bounced a message after the server had confirmed it (or one that is "
                        "not ours): %s", self.network, sanitise(sender), why)
            return
        if sender not in (message.to, message.to.split("/", 1)[0]):
            log.warning("xmpp %s: ignoring a bounce from %s for a message to %s: %s", self.network,
                        sanitise(sender), sanitise(message.to), why)
            return
        log.warning("xmpp %s: message to %s bounced: %s", self.network, sanitise(message.to), why)
        error = NotDelivered if etype == "wait" else Undeliverable
        message.receipt.fail(error(f"xmpp {self.network}: {sanitise(message.to)} refused the message: {why}"))

    def _receipt(self) -> Receipt:
        receipt = Receipt()
        receipt.future.add_done_callback(lambda _: self._settled(receipt))
        return receipt

    def _settled(self, receipt: Receipt) -> None:
        """A receipt is settled (or its holder cancelled it): its ids are forgotten."""
        for msg_id in receipt.ids:
            self._open.pop(msg_id, None)

    # --- sessions ------------------------------------------------------------------------

    def session_resumed(self) -> None:
        """Lines handed to slixmpp that never reached the socket (they are not
        in the plugin's unacked queue) are queued again, at the head; slixmpp
        resends the others."""
        unacked = {id(s) for _, s in self.client.plugin["xep_0198"].unacked_queue}
        self._requeue([message for message in self.inflight.values() if id(message.stanza) not in unacked])

    def session_ended(self) -> None:
        """A new session is needed: nothing unconfirmed will be resent by the
        library, so it goes back to the head of our queue, in order."""
        self._unpinged.clear()
        self._requeue(list(self.inflight.values()))

    def _requeue(self, messages: list[OutMessage]) -> None:
        if not messages:
            return
        for message in messages:
            self.inflight.pop(message.id, None)
            self._requeued.add(message.id)
            message.stanza = None
        again = [message for message in messages if not message.receipt.done]   # not failed or given up on
        if not again:
            return
        self.queue.requeue([(message.key, message) for message in again])
        log.info("xmpp %s: %d unconfirmed message(s) queued again", self.network, len(again))
        self._wakeup.set()

    def is_own(self, msg_id: str) -> bool:
        """``msg_id`` is one of our room messages (the room reflecting it back)."""
        return msg_id in self._sent_set

    def _remember_sent(self, msg_id: str) -> None:
        if len(self._sent_ids) == self._sent_ids.maxlen:
            self._sent_set.discard(self._sent_ids[0])
        self._sent_ids.append(msg_id)
        self._sent_set.add(msg_id)

    def close(self, reason: str) -> int:
        """Fail every receipt still open with ``NotDelivered(reason)``; returns how many."""
        for handle in (self._ack_timer, self._ping_timer, self._ack_answer):
            if handle is not None:
                handle.cancel()
        receipts = {id(m.receipt): m.receipt for m in self._open.values() if not m.receipt.done}
        for receipt in receipts.values():
            receipt.fail(NotDelivered(f"xmpp {self.network}: {reason}"))
        return len(receipts)
