"""Outgoing lines: queued fairly per target, paced, confirmed, sent again
after a reconnect, private lines only to the person who asked, and a receipt
(``receipts.Receipt``) per message that says when the server has it.

Delivery guarantee: a line leaves its queue when it is written to a
registered connection, and is forgotten only once the server confirmed that
it processed it: by echoing it (IRCv3 ``echo-message``), or by answering a
``PING :marker`` written after it (servers process a client's lines in
order).  A message's receipt resolves when every one of its lines is
confirmed so.  Lines still unconfirmed when a connection dies are sent
again, first and in order, once reconnected, and their receipts resolve
then: a receipt stays open while the bot is disconnected.  So no queued
line is lost while the bot runs (except as below), every receipt settles
once, and the only possible duplicate is a line the server processed just
as the connection died, before its confirmation came back: with
echo-message the lines of about one round trip; without it the lines
written since the last answered marker, which is about one round trip's
worth too while a token is spare, and at most MARKER_LINES lines (or
MARKER_AGE seconds) while lines wait for tokens.  A resolved receipt means
the server relayed the line (or accepted it for a channel), not that a
human read it.

Refusals: the server answers a line it will not deliver with a numeric
(``ERR_NOSUCHNICK`` 401, ``ERR_NOSUCHCHANNEL`` 403, ``ERR_CANNOTSENDTOCHAN``
404 ...) naming the target, written before the answer to any later line.
So the refusals that came in before a confirmation belong to the lines that
confirmation covers, and are counted against them, target by target, when
it arrives: a refused line is never counted as delivered.  Its message fails
``Undeliverable`` with the server's text (a channel), or ``NotDelivered``
(a person: gone or not taking messages now), and the rest of it is not sent.
With echo-message each delivered line is echoed, so the refused ones are
exactly those to that target that were not.  Without it, when a target
refused some but not all of the lines written to it since the last
confirmation (its modes changed meanwhile), nothing says which: every
message among them fails, so a message may be reported refused that the
server delivered, never the other way round.  (A refused NOTICE may get no
answer at all, as RFC 2812 asks: ngircd sends none, measured, InspIRCd does.
So with ``use_notice`` a refusal may go unreported and its receipt resolve.)

Fairness: lines are queued per target (a channel, a person) in a
``bot.outqueue.FairQueue`` and taken round-robin, so one user's long answer
costs anyone else at most one line per turn.  A target with nothing queued
is served next (its first line goes ahead of the round: a one-line answer
waits for at most one token), unless lines sent again after a reconnect are
waiting.  A target that goes away (a person who quits, a channel the bot
left) is dropped with its lines; their messages fail ``NotDelivered``.

The cap: a target may have at most ``max_queued_lines`` lines queued, and a
message is queued whole or not at all.  One that does not fit beside the
lines already waiting for its target is not queued and its receipt fails
``NotDelivered`` at once: nothing of it was sent, so trying again later (the
outbox sends one message per target at a time) repeats nothing.  One longer
than the cap on its own can never go whole: its first lines and a note
saying how many were left out are sent, as for a command's long answer, and
its receipt fails ``Undeliverable`` once they are confirmed.

Private lines to someone the server vouched for (a services account, or a
user@host for hostmask identities) follow the person across NICK changes,
and before each one leaves, the nick is checked to be still theirs
(``roster.Roster.verify``).  For someone in a channel with the bot that is a
lookup: the server keeps the bot told.  Otherwise the person's lines wait
aside, blocking no one, while a WHO asks the server; it is written only when
two tokens are there, so that the line its answer releases goes at once, and
the answer counts for that line and those written with it, before the writer
next waits (a paced backlog asks again: two tokens a line).  Lines whose nick
changed hands, or that nobody holds, are dropped, logged once, and their
messages fail ``NotDelivered``.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

from bot.chat import NotDelivered, Offline, Undeliverable
from bot.logsafety import sanitise
from bot.outqueue import FairQueue, overflow_note
from bot.pacing import TokenBucket
from bot.transports.irc.receipts import Receipt
from bot.transports.irc.roster import CHANGED, CHECK_TIMEOUT, GONE, OK, UNKNOWN
from bot.transports.irc.text import Fold, split_utf8

log = logging.getLogger(__name__)

# Without echo-message a ``PING :marker`` confirms every line written before
# it.  One marker is outstanding at a time, and the next goes out as soon as
# the last was answered and lines were written since, so after a crash only
# the lines of about one round trip are resent twice.  A marker is a command
# like any other (InspIRCd's fakelag and ngircd's penalty count PING, measured),
# so it spends a token: while lines wait for tokens it is written after at most
# MARKER_LINES lines (or MARKER_AGE seconds), not after every line, which would
# halve the paced rate; when a token is spare it delays nothing and goes at once.
# 12 lines per marker keeps a backlog at 12/13 (92%) of the configured rate in
# lines (at the default 1/s, MARKER_AGE comes first: ~10/11); the price is that
# a crash mid-backlog may repeat up to that many lines the server had relayed.
MARKER_LINES = 12
MARKER_AGE = 10.0
ECHO_GRACE = 3.0                # with echo-message: a line not echoed by then gets a marker PING
MAX_BATCH = 32                  # lines per socket write at most (then yield to the loop)
STATUS_PREFIXES = "~&@%+"       # "@#ops": a channel's ops; a refusal may name "@#ops" or "#ops"

Clock = Callable[[], float]


@dataclass(frozen=True)
class Dest:
    """Where lines go: a channel, or a person (by nick, bound to the account or
    user@host the server vouched for when they asked, if any)."""

    key: str                                   # the name casefolded: what identifies the target
    name: str = field(compare=False)           # as written on the wire
    private: bool = False
    account: str | None = None                 # services account the nick must still be logged in as
    userhost: str | None = None                # or the user@host it must still have
    more_accounts: tuple[str, ...] = ()        # a Person's other accounts: being logged into one counts too

    @property
    def bound(self) -> bool:
        return self.private and (self.account is not None or self.userhost is not None)

    def renamed(self, key: str, name: str) -> "Dest":
        return Dest(key, name, self.private, self.account, self.userhost, self.more_accounts)


@dataclass(eq=False)
class OutLine:
    dest: Dest
    command: str                 # PRIVMSG | NOTICE
    text: str
    seq: int = 0                 # set when written
    written: float = 0.0
    again: bool = False          # sent again after a reconnect: goes first
    target: str = ""             # the name it was written to (the person may have changed nick since)
    receipt: Receipt | None = None   # its message's (None: a note of ours)


class Lanes:
    """The queued lines of every target.  ``fresh`` holds the first line of a
    target that had nothing queued (served before the round), ``main`` the
    round-robin, ``held`` the lines of people whose nick is being checked."""

    def __init__(self, max_per_target: int, on_cut: Callable[[list[OutLine]], None] = lambda lines: None) -> None:
        self.max = max_per_target
        self.fresh: FairQueue[Dest, OutLine] = FairQueue(2)
        self.main: FairQueue[Dest, OutLine] = FairQueue(max_per_target - 1)
        self.held: FairQueue[Dest, OutLine] = FairQueue(max_per_target)
        self.held_since: dict[Dest, float] = {}
        self.on_cut = on_cut          # told of every line the cap leaves out (their receipts)

    def __len__(self) -> int:
        return len(self.fresh) + len(self.main) + len(self.held)

    def ready(self) -> int:
        """Lines that may be written as soon as tokens allow."""
        return len(self.fresh) + len(self.main)

    def room(self, dest: Dest) -> int:
        """How many more lines ``dest`` may have queued now (``put`` cuts beyond that)."""
        if self.held.queued(dest):
            return self.max - self.held.queued(dest)
        if not self.fresh.queued(dest) and not self.main.queued(dest):
            return self.max
        return self.main.max_per_target - self.main.queued(dest)

    def _put(self, queue: FairQueue[Dest, OutLine], dest: Dest, lines: list[OutLine]) -> int:
        """``queue.put``, telling ``on_cut`` which lines it leaves out."""
        room = queue.max_per_target - queue.queued(dest)
        if len(lines) > room:
            self.on_cut(lines[max(room - 1, 0):])
        return queue.put(dest, lines, lambda n: OutLine(dest, lines[0].command, overflow_note(n)))

    def put(self, dest: Dest, lines: list[OutLine]) -> int:
        """Queue an answer's lines; returns how many were left out (cap)."""
        if not lines:
            return 0
        if self.held.queued(dest):
            return self._put(self.held, dest, lines)
        if not self.fresh.queued(dest) and not self.main.queued(dest):
            self.fresh.put(dest, lines[:1], lambda n: lines[0])      # an empty queue of 2: it fits
            lines = lines[1:]
        return self._put(self.main, dest, lines) if lines else 0

    def head(self) -> tuple[Dest, OutLine] | None:
        main = self.main.head()
        if main is not None and main[1].again:          # sent again after a reconnect: first
            return main
        return self.fresh.head() or main

    def pop(self) -> tuple[Dest, OutLine]:
        main = self.main.head()
        if main is not None and main[1].again:
            return self.main.pop()
        return self.fresh.pop() if self.fresh else self.main.pop()

    def push_front(self, dest: Dest, line: OutLine) -> None:
        """The rest of a line that had to be cut when written: next for its target."""
        self.main.requeue([(dest, line)])

    def requeue(self, lines: list[OutLine]) -> None:
        for line in lines:
            line.again = True
        self.main.requeue([(line.dest, line) for line in lines])

    def _take(self, queue: FairQueue[Dest, OutLine], dest: Dest) -> list[OutLine]:
        items = [item for target, item in queue if target == dest]
        queue.drop(dest)
        return items

    def hold(self, dest: Dest, now: float) -> None:
        """Set ``dest``'s lines aside until its nick is checked."""
        items = self._take(self.fresh, dest) + self._take(self.main, dest)
        if items:
            self._put(self.held, dest, items)
        self.held_since.setdefault(dest, now)

    def release(self, dest: Dest) -> None:
        """Checked: back in line, as a target with nothing queued."""
        self.held_since.pop(dest, None)
        items = self._take(self.held, dest)
        for line in items:
            line.again = False
        self.put(dest, items)

    def drop(self, dest: Dest) -> int:
        self.held_since.pop(dest, None)
        return self.fresh.drop(dest) + self.main.drop(dest) + self.held.drop(dest)

    def targets(self) -> set[Dest]:
        return {*self.fresh.targets(), *self.main.targets(), *self.held.targets()}

    def rename(self, old: Dest, new: Dest) -> None:
        for queue in (self.fresh, self.main, self.held):
            queue.rename(old, new)
        if old in self.held_since:
            self.held_since[new] = self.held_since.pop(old)
        if self.held.queued(new) and (self.fresh.queued(new) or self.main.queued(new)):
            self.hold(new, self.held_since.get(new, 0.0))      # merged with lines held: all wait

    def __iter__(self) -> Iterator[tuple[Dest, OutLine]]:
        yield from self.fresh
        yield from self.main
        yield from self.held


@dataclass(frozen=True)
class Refusal:
    """A numeric refusing one of our lines: the target it names (casefolded) and its text."""

    target: str
    text: str
    fold: Fold


class Delivery:
    """A network's outgoing lines, across connections."""

    def __init__(self, network: str, max_queued: int, clock: Clock) -> None:
        self.network = network
        self.clock = clock
        self.lanes = Lanes(max_queued, self._cut)
        self.unconfirmed: deque[OutLine] = deque()
        self.refusals: list[Refusal] = []      # not yet counted against a line (see the module docstring)
        self.seq = 0

    def pending(self) -> int:
        return len(self.lanes) + len(self.unconfirmed)

    def put(self, dest: Dest, command: str, texts: list[str], receipt: Receipt | None = None) -> None:
        """Queue a message's lines, whole or not at all (see the cap in the module
        docstring); ``receipt`` settles when the server has them all."""
        lines = [OutLine(dest, command, text, receipt=receipt) for text in texts]
        if receipt is not None:
            if not lines:
                receipt.future.set_result(None)        # nothing to confirm
                return
            receipt.add(len(lines))
        cap, room = self.lanes.max, self.lanes.room(dest)
        name = sanitise(dest.name, 60)
        if len(lines) > cap:
            if receipt is not None:
                receipt.cut = (f"{self.network}: a message of {len(lines)} lines for {name} is longer than "
                               f"max_queued_lines ({cap}): only its first lines and a note were sent")
        elif len(lines) > room:
            log.info("%s: a message of %d line(s) for %s not queued: %d line(s) wait for it already, "
                     "at most %d may", self.network, len(lines), name, cap - room, cap)
            if receipt is not None:
                receipt.fail(NotDelivered(f"{self.network}: {cap - room} line(s) wait for {name} already "
                                          f"(max_queued_lines {cap}); try again later"))
            return
        left_out = self.lanes.put(dest, lines)
        if left_out:
            log.info("%s: %d line(s) for %s left out: at most %d may wait per target", self.network,
                     left_out, name, cap)

    def _cut(self, lines: list[OutLine]) -> None:
        """Lines the cap left out: their messages are not whole (``Receipt.cut``)."""
        for line in lines:
            receipt = line.receipt
            if receipt is not None:
                if receipt.cut is None:
                    receipt.cut = (f"{self.network}: part of a message for {sanitise(line.dest.name, 60)} "
                                   f"was left out: at most {self.lanes.max} lines may wait per target")
                receipt.confirmed()

    def requeue(self) -> None:
        """After a connection ended: unconfirmed lines go out again first (see the
        module docstring), and lines held for a check wait for the next connection's."""
        self.refusals.clear()                  # they were about lines processed: those go again
        for dest in list(self.lanes.held_since):
            self.lanes.release(dest)
        if self.unconfirmed:
            log.info("%s: %d unconfirmed line(s) will be sent again", self.network, len(self.unconfirmed))
            self.lanes.requeue(list(self.unconfirmed))
            self.unconfirmed.clear()

    def confirm(self, seq: int, echoed: OutLine | None = None) -> None:
        """The server processed every line up to ``seq`` (``echoed``: by echoing
        that one); those it refused were refused before now."""
        done: list[OutLine] = []
        while self.unconfirmed and self.unconfirmed[0].seq <= seq:
            done.append(self.unconfirmed.popleft())
        errors = self._refused(done, echoed) if self.refusals else {}
        for line in done:
            if line.receipt is not None:
                error = errors.get(id(line))
                if error is None:
                    line.receipt.confirmed()
                else:
                    line.receipt.fail(error)

    def echoed(self, command: str, target: str, text: str, fold: Callable[[str], str]) -> None:
        """Our own line came back: it, and every line written before it, was processed."""
        for line in self.unconfirmed:
            if line.command == command and line.text == text and fold(line.target) == fold(target):
                self.confirm(line.seq, echoed=line)
                return

    def refused(self, target: str, text: str, fold: Fold) -> None:
        """The server refused a line to ``target``: counted at the next
        confirmation; at once when every line it can be about (unconfirmed, to
        that target) is of one message, so the rest of it is not sent."""
        refusal = Refusal(fold(target), text, fold)
        if len(self.refusals) < len(self.unconfirmed):     # each is about one of them: more are not ours
            self.refusals.append(refusal)
        candidates = [line for line in self.unconfirmed if _addressed(fold(line.target), refusal.target)]
        receipts = {id(line.receipt) for line in candidates}
        if len(receipts) == 1 and candidates[0].receipt is not None:
            candidates[0].receipt.fail(self._refusal(candidates[0], sanitise(text, 200)))

    def _refused(self, done: list[OutLine], echoed: OutLine | None) -> dict[int, NotDelivered | Undeliverable]:
        """Which of the lines just confirmed the server refused, and how their
        messages fail (see the module docstring)."""
        refusals, self.refusals = self.refusals, []
        by_target: dict[str, list[Refusal]] = {}
        for refusal in refusals:
            by_target.setdefault(refusal.target, []).append(refusal)
        errors: dict[int, NotDelivered | Undeliverable] = {}
        for target, found in by_target.items():
            fold = found[0].fold
            candidates = [line for line in done if line is not echoed and _addressed(fold(line.target), target)]
            if not candidates:
                log.debug("%s: a refusal for %s matches no line written", self.network, sanitise(target, 60))
                continue
            exact = len(found) >= len(candidates) or len({id(line.receipt) for line in candidates}) == 1
            for i, line in enumerate(candidates):
                text = sanitise(found[min(i, len(found) - 1)].text, 200)
                if not exact:
                    text += (f" (the server refused {len(found)} of {len(candidates)} lines to "
                             f"{sanitise(line.target, 60)} without saying which)")
                errors[id(line)] = self._refusal(line, text)
        return errors

    def _refusal(self, line: OutLine, text: str) -> NotDelivered | Undeliverable:
        name = sanitise(line.target, 60)
        if line.dest.private:                  # a nick: gone, or not taking messages now
            return self._gone(line, f"the server: {text}")
        return Undeliverable(f"{self.network}: the server refused the message to {name}: {text}")

    def _gone(self, line: OutLine, why: str) -> NotDelivered:
        receipt = line.receipt
        if receipt is not None and receipt.person is not None:
            return Offline(f"{receipt.person} is not online on {self.network} under a verified nick ({why})")
        return NotDelivered(f"{self.network}: not delivered to {sanitise(line.dest.name, 60)}: {why}")

    def fail_open(self, error: NotDelivered) -> None:
        """Every receipt still open fails with ``error`` (the transport closes)."""
        for line in [*(line for _, line in self.lanes), *self.unconfirmed]:
            if line.receipt is not None:
                line.receipt.fail(error)

    # -- targets coming and going ---------------------------------------------------------

    def drop(self, dest: Dest, why: str) -> None:
        lines = [line for target, line in self.lanes if target == dest]
        dropped = self.lanes.drop(dest)
        for line in lines:
            if line.receipt is not None:
                line.receipt.fail(self._gone(line, why))
        if dropped:
            log.warning("%s: dropped %d line(s) queued for %s: %s", self.network, dropped,
                        sanitise(dest.name, 60), why)

    def person_renamed(self, old_key: str, new_key: str, new_name: str) -> None:
        """A nick change seen: lines queued for that person follow the nick."""
        for dest in self.lanes.targets():
            if dest.private and dest.key == old_key:
                new = dest.renamed(new_key, new_name)
                self.lanes.rename(dest, new)
                for line in self.unconfirmed:      # sent again after a reconnect: to the new nick
                    if line.dest == dest:
                        line.dest = new

    def person_gone(self, key: str, why: str) -> None:
        for dest in self.lanes.targets():
            if dest.private and dest.key == key:
                self.drop(dest, why)

    def channel_left(self, channel_key: str, why: str) -> None:
        """The bot is no longer in a channel: its lines (and those to its ops,
        ``@#ops``) have nowhere to go."""
        for dest in self.lanes.targets():
            if not dest.private and (dest.key == channel_key or dest.key[1:] == channel_key):
                self.drop(dest, why)

    def checked(self, key: str) -> None:
        """The server answered about a nick: its held lines may be checked again."""
        for dest in list(self.lanes.held_since):
            if dest.key == key:
                self.lanes.release(dest)

    def release_stale(self, now: float) -> None:
        """Held lines whose check got no answer: back in line, to ask again."""
        for dest, since in list(self.lanes.held_since.items()):
            if now - since >= CHECK_TIMEOUT:
                self.lanes.release(dest)


def _addressed(written: str, named: str) -> bool:
    """Whether a refusal naming ``named`` is about a line written to ``written``
    (both casefolded): "@#ops" may come back as "#ops"."""
    return written == named or (len(written) > 2 and written[0] in STATUS_PREFIXES and written[1] in "#&+!"
                                and written[1:] == named)


class Link(Protocol):
    """What the writer needs of its connection (``session.Session``; a fake in tests)."""

    number: int
    control: deque[str]
    quitting: str | None
    marker: tuple[str, int] | None
    marker_count: int

    @property
    def alive(self) -> bool: ...

    @property
    def echo(self) -> bool:
        """The server echoes our messages (IRCv3 echo-message)."""

    def write_lines(self, lines: list[str]) -> None: ...

    def budget(self, command: str, target: str) -> int: ...

    def verify(self, dest: Dest, answered: bool) -> str:
        """``roster.Roster.verify`` for the person ``dest`` is bound to."""

    def ask(self, nick: str) -> str | None:
        """The WHO line that asks the server who holds ``nick`` (None: already asked)."""

    def leave(self) -> None:
        """Every line is confirmed and the connection was asked to quit: QUIT now."""


@dataclass(frozen=True)
class Pause:
    """What the writer waits for: ``seconds`` (None: until woken), or woken early."""

    seconds: float | None
    wake: bool = False
    stop: bool = False


class Writer:
    """The one writer of a connection: control lines first, then a
    confirmation marker when one is due, then a WHO about a nick, then
    messages; every line spends a token.  Lines that may go at once are
    written together, before the writer next waits.  ``step`` decides without
    waiting (tests drive it with a fake clock); ``session.Session.pump`` does
    the waiting."""

    def __init__(self, delivery: Delivery, link: Link, rate: float, burst: int, clock: Clock) -> None:
        self.delivery = delivery
        self.link = link
        self.clock = clock
        self.tokens = TokenBucket(rate, burst, clock)
        self.ask_tokens = min(2, burst)      # a WHO, and the line its answer releases
        self.batch: list[str] = []
        self.asks: deque[str] = deque()      # nicks to ask the server about
        self.answered: set[Dest] = set()     # a WHO answered: their next line goes on that answer ...
        self.burst: set[Dest] = set()        # ... and so do the lines written with it

    def flush(self) -> None:
        if self.batch:
            self.link.write_lines(self.batch)
            self.batch.clear()

    def pause(self, seconds: float | None, wake: bool = False) -> Pause:
        self.flush()
        self.burst.clear()                   # what a WHO answer said is stale once we wait
        return Pause(seconds, wake)

    def step(self) -> Pause:
        """Write (into the batch) what may go now; flush and say how to wait."""
        link, delivery, lanes = self.link, self.delivery, self.delivery.lanes
        while link.alive:
            unconfirmed = delivery.unconfirmed
            quitting = link.quitting is not None
            if quitting and not link.control and not unconfirmed:
                self.flush()                    # all confirmed: nothing can be lost or doubled by leaving
                link.leave()
                return Pause(None, stop=True)
            sending = lanes.ready() > 0 and not quitting
            want_marker = self.marker_due(sending)
            asking = bool(self.asks) and not quitting
            if not (link.control or sending or want_marker or asking):
                return self.pause(ECHO_GRACE / 3 if unconfirmed else None, wake=True)
            delay = self.tokens.delay()
            if delay > 0 or len(self.batch) >= MAX_BATCH:
                return self.pause(delay)
            if link.control:
                self.batch.append(link.control.popleft())
            elif want_marker:
                link.marker_count += 1
                token = f"rb{link.number}.{link.marker_count}"
                link.marker = (token, unconfirmed[-1].seq)
                self.batch.append(f"PING :{token}")
            elif asking:
                delay = self.tokens.delay(self.ask_tokens)
                if delay > 0:
                    return self.pause(delay)
                question = link.ask(self.asks.popleft())
                if question is None:
                    continue                    # already asked: its answer will come
                self.batch.append(question)
            else:
                head = lanes.head()
                assert head is not None
                receipt = head[1].receipt
                if receipt is not None and receipt.done:
                    lanes.pop()                 # its message failed (or was given up): not the rest of it
                    continue
                if not self._may_write(head[0]):
                    continue                    # set aside or dropped: no token spent
                self._write(*lanes.pop())
            self.tokens.take()
        self.flush()
        return Pause(None, stop=True)

    def _may_write(self, dest: Dest) -> bool:
        """Whether ``dest``'s next line may go now (see the module docstring)."""
        if not dest.bound:
            return True
        verdict = self.link.verify(dest, dest in self.answered or dest in self.burst)
        if verdict == OK:
            return True
        self.answered.discard(dest)
        lanes = self.delivery.lanes
        if verdict == UNKNOWN:
            lanes.hold(dest, self.clock())
            if dest.name not in self.asks:
                self.asks.append(dest.name)
            return False
        why = {CHANGED: "the nick is someone else's now", GONE: "nobody has the nick now"}.get(
            verdict, "this server cannot tell who has the nick now")
        self.delivery.drop(dest, why)
        return False

    def _write(self, dest: Dest, line: OutLine) -> None:
        if dest in self.answered:
            self.answered.discard(dest)
            self.burst.add(dest)
        head, rest = split_utf8(line.text, self.link.budget(line.command, dest.name))
        if rest:                                # our own prefix grew since it was cut (a longer nick)
            if line.receipt is not None:
                line.receipt.add()
            self.delivery.lanes.push_front(dest, OutLine(dest, line.command, rest, again=line.again,
                                                         receipt=line.receipt))
        self.delivery.seq += 1
        sent = OutLine(dest, line.command, head, self.delivery.seq, self.clock(), target=dest.name,
                       receipt=line.receipt)
        self.batch.append(f"{line.command} {dest.name} :{head}")
        self.delivery.unconfirmed.append(sent)

    def checked(self, key: str) -> None:
        """The server answered a WHO about a nick: the lines held for it are
        back in line, their next one to go on that answer."""
        for dest in list(self.delivery.lanes.held_since):
            if dest.key == key:
                self.answered.add(dest)
        self.delivery.checked(key)

    def marker_due(self, sending: bool) -> bool:
        """Whether to write a confirmation marker now (see MARKER_LINES)."""
        unconfirmed = self.delivery.unconfirmed
        if not unconfirmed or self.link.marker is not None:   # nothing to confirm, or one already on its way
            return False
        if self.link.quitting is not None:
            return True
        age = self.clock() - unconfirmed[0].written
        if self.link.echo:                                     # echoes confirm; a marker only for lines never echoed
            return age >= ECHO_GRACE
        spare = self.tokens.available() - self.delivery.lanes.ready()   # tokens beyond what queued lines need
        return (not sending                                    # nothing else to write
                or spare >= 1                                  # a spare token: the marker delays no line
                or (len(unconfirmed) >= MARKER_LINES and spare < 0)   # pacing holds lines back anyway
                or age >= MARKER_AGE)
