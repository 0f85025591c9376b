"""Outbound delivery: a fair, capped queue per target, paced, acknowledged by
the server (XEP-0198) and sent again after a new session.

What "delivered once" means here:

* ``put`` only queues.  A message leaves the queue only while a session is
  up and every configured room has been (re)joined (``online``), paced by a
  token bucket, round-robin between targets (a room, a JID, an occupant
  ``room/nick``): a one-line answer to one person waits behind at most one
  message per other target, never behind someone else's long output.
* With XEP-0198 stream management (Prosody 0.12 ``smacks``), a message
  counts as delivered only when the server acknowledges it.  If the stream
  is resumed, slixmpp resends the unacknowledged stanzas; if a new session
  has to be started (server restarted), the unacknowledged messages go back
  to the head of their targets' queues, in order.  Messages queued while
  disconnected are therefore delivered exactly once, in order, after the
  reconnect; one whose acknowledgement was lost on the wire (the server got
  it, the ack did not reach us) may be delivered twice.
* Without stream management, a message counts as delivered once it is
  written to a live session's socket: queued messages are still delivered
  exactly once, in order, but one written just before the connection died
  may be lost (at most once).
* Each target may have ``max_queued_lines`` lines of text queued (lines as
  split at ``max_line_chars``, however they are packed into messages): the
  lines of an answer beyond that are replaced by one note saying how many
  were left out.  A target that is gone (a room the bot left, an occupant
  who left) is dropped with everything queued for it.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from bot.logsafety import sanitise
from bot.outqueue import FairQueue, overflow_note
from bot.pacing import TokenBucket
from bot.transports.xmpp.config import XmppConfig
from bot.transports.xmpp.text import pack, split_lines

log = logging.getLogger(__name__)

Key = tuple[str, str]          # (to, message type): ("ops@conference.example.org", "groupchat")
SENT_IDS_REMEMBERED = 500      # our own room messages, to recognise them reflected back


@dataclass
class OutMessage:
    """One outbound chat message (one or more lines of text), with the stanza
    currently carrying it."""

    to: str
    mtype: str                 # "chat" | "groupchat"
    body: str
    lines: int                 # lines of text in it, for the per-target cap
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
        self.inflight: dict[str, OutMessage] = {}   # handed to slixmpp, not yet delivered
        self._bucket = TokenBucket(config.rate, config.burst)
        self._wakeup = asyncio.Event()
        self._requeued: set[str] = set()         # ids of messages queued again after a dead session
        self._sent_ids: collections.deque[str] = collections.deque(maxlen=SENT_IDS_REMEMBERED)
        self._sent_set: set[str] = set()
        self._ack_timer: asyncio.Handle | None = None
        self._ack_answer: asyncio.Handle | None = None

    @property
    def undelivered(self) -> int:
        """Messages queued or sent but not yet acknowledged by the server."""
        return len(self.queue) + len(self.inflight)

    def wake(self) -> None:
        self._wakeup.set()

    # --- queueing --------------------------------------------------------------------

    def put(self, to: str, mtype: str, text: str) -> None:
        """Queue ``text`` for ``to``: its lines packed into as few messages as
        ``max_line_chars`` allows, within the target's cap."""
        key = (to, mtype)
        lines = split_lines(text, self.max_line_chars)
        room = self.queue.max_per_target - sum(queued.lines for k, queued in self.queue if k == key)
        if len(lines) > room:
            keep = max(room - 1, 0)
            left_out = len(lines) - keep
            lines = [*lines[:keep], overflow_note(left_out)] if room >= 1 else []
            log.warning("xmpp %s: %d line(s) to %s left out: more than max_queued_lines (%d) queued for it",
                        self.network, left_out, sanitise(to), self.queue.max_per_target)
        messages = [OutMessage(to, mtype, body, body.count("\n") + 1) for body in pack(lines, self.max_line_chars)]
        self.queue.put(key, messages, lambda n: OutMessage(to, mtype, overflow_note(n), 1))
        self._wakeup.set()

    def drop_room(self, room: str) -> int:
        """Forget what is queued for ``room`` and its occupants (``room/nick``)."""
        return self._drop(lambda key: key[0] == room or key[0].startswith(room + "/"))

    def drop_occupant(self, room: str, nick: str) -> int:
        occupant = (f"{room}/{nick}", "chat")
        return self._drop(lambda key: key == occupant)

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
                          and key[0][len(prefix):] not in present)

    def _drop(self, condition: Callable[[Key], bool]) -> int:
        for key, message in self.queue:
            if condition(key):
                self._requeued.discard(message.id)
        return self.queue.drop_where(condition)

    # --- sending ------------------------------------------------------------------------

    async def pump(self) -> None:
        while True:
            if not (self.online.is_set() and self.queue):
                self._wakeup.clear()
                await self._wakeup.wait()
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
            except Exception:   # e.g. an invalid JID in a target: drop that message, not the pump
                log.exception("xmpp %s: cannot send to %s", self.network, sanitise(message.to))
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
        if self.client.transport is None:
            return None         # the session died: the message stays in flight and is requeued
        if not self.client.plugin["xep_0198"].enabled_out:
            del self.inflight[message.id]       # no acks on this stream: written counts as delivered
        elif self._ack_timer is None:
            # Ask the server to acknowledge what we wrote, once per batch: the call
            # runs after this pass of slixmpp's send loop has written it.
            self._ack_timer = asyncio.get_running_loop().call_soon(self._request_ack)
        return stanza

    def _request_ack(self) -> None:
        self._ack_timer = None
        client = self.client
        if client is not None and client.transport is not None and client.plugin["xep_0198"].enabled_out:
            client.plugin["xep_0198"].request_ack()

    def acked(self, stanza: Any) -> None:
        """slixmpp's ``stanza_acked``: the server has this one."""
        message = self.inflight.get(stanza["id"])
        if message is not None and message.stanza is stanza:
            del self.inflight[message.id]
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

    # --- sessions ------------------------------------------------------------------------

    def session_resumed(self) -> None:
        """Lines handed to slixmpp that never reached the socket (they are not
        in the plugin's unacked queue) are queued again, at the head; slixmpp
        resends the others."""
        unacked = {id(s) for _, s in self.client.plugin["xep_0198"].unacked_queue}
        self._requeue([message for message in self.inflight.values() if id(message.stanza) not in unacked])

    def session_ended(self) -> None:
        """A new session is needed: nothing unacknowledged will be resent by
        the library, so it goes back to the head of our queue, in order."""
        self._requeue(list(self.inflight.values()))

    def _requeue(self, messages: list[OutMessage]) -> None:
        if not messages:
            return
        for message in messages:
            self.inflight.pop(message.id, None)
            self._requeued.add(message.id)
            message.stanza = None
        self.queue.requeue([(message.key, message) for message in messages])
        log.info("xmpp %s: %d unacknowledged message(s) queued again", self.network, len(messages))
        self._wakeup.set()

    def is_own(self, msg_id: str) -> bool:
        """``msg_id`` is one of our room messages (the room reflecting it back)."""
        return msg_id in self._sent_set

    def _remember_sent(self, msg_id: str) -> None:
        if len(self._sent_ids) == self._sent_ids.maxlen:
            self._sent_set.discard(self._sent_ids[0])
        self._sent_ids.append(msg_id)
        self._sent_set.add(msg_id)

    def close(self) -> None:
        for handle in (self._ack_timer, self._ack_answer):
            if handle is not None:
                handle.cancel()
