"""IRC delivery without a server or a sleep: the writer (pacing, confirmation
markers, echo grace, spare tokens), fairness between targets, the cap, the
check of who holds a nick, and resending after a reconnect, driven by a fake
clock and a fake connection that answers marker PINGs and echoes lines after
a round trip; and the roster those checks ask."""
from __future__ import annotations

import logging
from collections import deque

import pytest

from bot.chat import VERIFIED_SERVICES, Identity, Room
from bot.outqueue import overflow_note
from bot.transports.irc import IrcConfig, IrcTransport
from bot.transports.irc.delivery import (ECHO_GRACE, MARKER_AGE, MARKER_LINES, Delivery, Dest, Writer)
from bot.transports.irc.roster import CHANGED, GONE, OK, UNCHECKABLE, UNKNOWN, Roster

RTT = 0.01


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeLink:
    """The writer's connection: records what is written when, and plays a
    server that answers marker PINGs (and, with ``echo``, echoes messages)
    one round trip later."""

    def __init__(self, clock: Clock, delivery: Delivery, *, echo: bool = False, number: int = 1) -> None:
        self.clock = clock
        self.delivery = delivery
        self.number = number
        self.control: deque[str] = deque()
        self.quitting: str | None = None
        self.marker: tuple[str, int] | None = None
        self.marker_count = 0
        self.is_alive = True
        self.echoes = echo
        self.echoing = echo                  # False: the server stops echoing (a line it did not echo)
        self.wire: list[tuple[float, str]] = []
        self.due: list[tuple[float, str]] = []    # (when, line) the server answers
        self.verdicts: dict[str, str] = {}        # nick key -> what verify says (watched nicks)
        self.asked: list[str] = []
        self.unwatched: set[str] = set()
        self.left = False

    @property
    def alive(self) -> bool:
        return self.is_alive

    @property
    def echo(self) -> bool:
        return self.echoes

    def write_lines(self, lines: list[str]) -> None:
        for line in lines:
            self.wire.append((self.clock(), line))
            if line.startswith("PING :") or (self.echoing and line.startswith(("PRIVMSG", "NOTICE"))):
                self.due.append((self.clock() + RTT, line))

    def budget(self, command: str, target: str) -> int:
        return 400

    def verify(self, dest: Dest, answered: bool) -> str:
        if dest.key in self.unwatched:                # shares no channel: only a fresh answer counts
            return OK if answered else UNKNOWN
        return self.verdicts.get(dest.key, OK)

    def ask(self, nick: str) -> str | None:
        self.asked.append(nick)
        return f"WHO {nick}"

    def leave(self) -> None:
        self.left = True
        self.is_alive = False

    def answer(self) -> None:
        """The server's answers that are due by now (as session.Session handles them)."""
        now = self.clock()
        for when, line in [d for d in self.due if d[0] <= now]:
            self.due.remove((when, line))
            if line.startswith("PING :"):
                if self.marker and line[6:] == self.marker[0]:
                    self.delivery.confirm(self.marker[1])
                    self.marker = None
            else:
                command, target, text = line.split(" ", 2)
                self.delivery.echoed(command, target, text[1:], str.lower)

    def messages(self, target: str | None = None) -> list[tuple[float, str]]:
        """(time, text) of the PRIVMSGs written (to ``target``)."""
        out = []
        for when, line in self.wire:
            if line.startswith("PRIVMSG "):
                _, to, text = line.split(" ", 2)
                if target is None or to == target:
                    out.append((when, text[1:]))
        return out


def make(rate: float = 1.0, burst: int = 5, *, echo: bool = False, max_queued: int = 60
         ) -> tuple[Clock, Delivery, FakeLink, Writer]:
    clock = Clock()
    delivery = Delivery("testnet", max_queued, clock)
    link = FakeLink(clock, delivery, echo=echo)
    return clock, delivery, link, Writer(delivery, link, rate, burst, clock)


def run(clock: Clock, link: FakeLink, writer: Writer, seconds: float) -> None:
    """Let ``seconds`` pass: the writer writes, waits, is woken by the server's answers."""
    end = clock.now + seconds
    while True:
        link.answer()
        pause = writer.step()
        if pause.stop:
            return
        wakes = [when for when, _ in link.due]
        until = min([end, *wakes] + ([clock.now + pause.seconds] if pause.seconds is not None else []))
        if until <= clock.now and pause.seconds == 0:
            continue                          # a full batch: go on at once
        if clock.now >= end:
            return
        clock.now = max(until, clock.now + 1e-9)


ROOM = Dest("#ops", "#ops")
ALICE = Dest("alice", "alice", True, account="alice")
BOB = Dest("bob", "bob", True)


def lines(n: int, prefix: str = "l") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


# -- pacing and confirmation markers --------------------------------------------------------------

def test_a_burst_goes_at_once_then_lines_follow_at_the_configured_rate() -> None:
    clock, delivery, link, writer = make(rate=2.0, burst=5)
    start = clock.now
    delivery.put(ROOM, "PRIVMSG", lines(25))
    run(clock, link, writer, 30)
    sent = link.messages()
    assert [text for _, text in sent] == lines(25)
    assert all(when == start for when, _ in sent[:5])                 # the burst, in one write
    gaps = [b[0] - a[0] for a, b in zip(sent[5:], sent[6:])]
    assert min(gaps) >= 0.5 - 1e-9                                     # never faster than 2 lines/s
    steady = (len(sent) - 6) / (sent[-1][0] - sent[5][0])
    assert steady >= 2.0 * MARKER_LINES / (MARKER_LINES + 1) * 0.99     # markers cost at most 1 in 13
    assert delivery.pending() == 0                                     # every line confirmed in the end


def test_a_marker_never_takes_a_token_a_queued_line_needs() -> None:
    # without echo-message marker PINGs confirm lines, and the server counts them like any
    # line: a burst of 5 still goes out at once, the marker after it
    clock, delivery, link, writer = make(rate=2.0, burst=5)
    clock.now += 10                                                    # the bucket is full
    start = clock.now
    delivery.put(ROOM, "PRIVMSG", lines(5))
    run(clock, link, writer, 5)
    wire = [(when - start, line) for when, line in link.wire]
    assert [line for _, line in wire[:5]] == [f"PRIVMSG #ops :l{i}" for i in range(5)]
    assert all(when == 0 for when, _ in wire[:5])
    assert wire[5][1].startswith("PING :rb1.") and wire[5][0] == pytest.approx(0.5)   # with the next token
    assert delivery.pending() == 0


def test_a_spare_token_sends_the_marker_at_once() -> None:
    # one marker on its way at a time; the next as soon as it was answered
    clock, delivery, link, writer = make(rate=1.0, burst=5)
    start = clock.now
    delivery.put(ROOM, "PRIVMSG", lines(2))
    run(clock, link, writer, 0.5)
    assert [(when - start, line) for when, line in link.wire] == [
        (0, "PRIVMSG #ops :l0"), (0, "PING :rb1.1"), (0, "PRIVMSG #ops :l1"),     # one write
        (pytest.approx(RTT), "PING :rb1.2")]
    assert delivery.pending() == 0


def test_while_pacing_holds_lines_back_a_marker_goes_every_MARKER_LINES_lines() -> None:
    clock, delivery, link, writer = make(rate=10.0, burst=5)
    delivery.put(ROOM, "PRIVMSG", lines(59))
    run(clock, link, writer, 20)
    between: list[int] = []
    count = 0
    for _, line in link.wire:
        if line.startswith("PING"):
            between.append(count)
            count = 0
        else:
            count += 1
    assert all(n == MARKER_LINES for n in between[:-1])     # the burst too: no token was spare
    sent = link.messages()
    steady = (len(sent) - 6) / (sent[-1][0] - sent[5][0])
    assert steady == pytest.approx(10.0 * MARKER_LINES / (MARKER_LINES + 1), rel=0.02)   # ~92% of the rate


def test_at_one_line_per_second_MARKER_AGE_comes_before_MARKER_LINES() -> None:
    clock, delivery, link, writer = make(rate=1.0, burst=5)
    delivery.put(ROOM, "PRIVMSG", lines(40))
    run(clock, link, writer, 60)
    pings = [when for when, line in link.wire if line.startswith("PING")]
    writes = [when for when, line in link.wire if line.startswith("PRIVMSG")]
    # between two markers: the lines of MARKER_AGE seconds (the oldest unconfirmed line's age)
    for first, second in zip(pings[1:], pings[2:]):
        in_between = [w for w in writes if first < w < second]
        assert len(in_between) < MARKER_LINES
        assert second - first <= MARKER_AGE + 1 + 1e-9
    assert len(writes) == 40 and delivery.pending() == 0


def test_with_echo_message_echoes_confirm_and_a_line_never_echoed_gets_a_marker_after_the_grace() -> None:
    clock, delivery, link, writer = make(rate=100.0, burst=5, echo=True)
    delivery.put(ROOM, "PRIVMSG", lines(20))
    run(clock, link, writer, 2)
    assert not any(line.startswith("PING") for _, line in link.wire)   # echoes did it all
    assert delivery.pending() == 0
    link.echoing = False                                               # a line the server does not echo
    start = clock.now
    delivery.put(ROOM, "PRIVMSG", ["lost echo"])
    run(clock, link, writer, ECHO_GRACE - 0.1)
    assert delivery.pending() == 1 and not any(line.startswith("PING") for _, line in link.wire)
    run(clock, link, writer, 2)
    [(when, ping)] = [(w, line) for w, line in link.wire if line.startswith("PING")]
    assert when - start == pytest.approx(ECHO_GRACE, abs=ECHO_GRACE / 3 + 0.01)
    assert delivery.pending() == 0


# -- resending after a reconnect ------------------------------------------------------------------------

def test_unconfirmed_lines_go_again_first_and_in_order_on_the_next_connection() -> None:
    clock, delivery, link, writer = make(rate=1.0, burst=5)
    delivery.put(ROOM, "PRIVMSG", lines(8, "r"))
    delivery.put(BOB, "PRIVMSG", lines(3, "b"))
    link.due.clear()
    writer.step()                                        # the burst is written; the connection dies unanswered
    written = [line for _, line in link.wire]
    assert len(written) == 5
    link.is_alive = False
    delivery.requeue()
    delivery.put(Dest("#new", "#new"), "PRIVMSG", ["fresh"])    # a new target while reconnecting

    link2 = FakeLink(clock, delivery, number=2)
    writer2 = Writer(delivery, link2, 1.0, 20, clock)
    clock.now += 30
    run(clock, link2, writer2, 60)
    again = [line for _, line in link2.wire if line.startswith("PRIVMSG")]
    assert again[:5] == written                          # first, in order
    assert sorted(again[5:]) == sorted({*(f"PRIVMSG #ops :r{i}" for i in range(8)), "PRIVMSG bob :b0",
                                        "PRIVMSG bob :b1", "PRIVMSG bob :b2", "PRIVMSG #new :fresh"} - {*written})
    assert [t for t in again if t.startswith("PRIVMSG #ops")] == [f"PRIVMSG #ops :r{i}" for i in range(8)]
    assert delivery.pending() == 0


def test_leaving_waits_until_every_written_line_is_confirmed() -> None:
    clock, delivery, link, writer = make(rate=100.0, burst=5)
    delivery.put(ROOM, "PRIVMSG", lines(3))
    writer.step()                                        # written, not yet confirmed
    assert len(delivery.unconfirmed) == 3
    link.quitting = "reconnecting to log in"
    delivery.put(ROOM, "PRIVMSG", ["for the next connection"])
    run(clock, link, writer, 1)
    assert link.left
    assert [line for _, line in link.wire][-1].startswith("PING :")   # no new line: it confirms the rest
    assert len(delivery.unconfirmed) == 0 and delivery.pending() == 1


# -- fairness and the cap -----------------------------------------------------------------------------------

def test_one_targets_long_answer_delays_another_ones_answer_by_one_token_at_most() -> None:
    clock, delivery, link, writer = make(rate=1.0, burst=5, echo=True)
    delivery.put(BOB, "PRIVMSG", lines(200, "flood"))
    run(clock, link, writer, 20)
    asked = clock.now
    delivery.put(ROOM, "PRIVMSG", ["carol: the answer"])
    run(clock, link, writer, 3)
    [(when, _)] = link.messages("#ops")
    assert when - asked <= 1.0 + 1e-9                    # the next token, not behind bob's 180 lines


def test_targets_take_turns_and_one_target_may_queue_at_most_max_queued_lines() -> None:
    clock, delivery, link, writer = make(rate=1000.0, burst=1000, echo=True, max_queued=10)
    delivery.put(BOB, "PRIVMSG", lines(25, "b"))
    delivery.put(ROOM, "PRIVMSG", lines(3, "r"))
    delivery.put(ALICE, "PRIVMSG", lines(3, "a"))
    run(clock, link, writer, 1)
    order = [line.split(" ", 1)[1] for _, line in link.wire]
    # a target's first line goes before the round; then one line each in turn
    assert order[:3] == ["bob :b0", "#ops :r0", "alice :a0"]
    assert order[3:9] == ["bob :b1", "#ops :r1", "alice :a1", "bob :b2", "#ops :r2", "alice :a2"]
    assert order[9:] == [f"bob :b{i}" for i in range(3, 9)] + [f"bob :{overflow_note(16)}"]


# -- private lines only to who asked ---------------------------------------------------------------------------

def test_a_persons_lines_wait_aside_while_the_server_is_asked_who_holds_the_nick(
        caplog: pytest.LogCaptureFixture) -> None:
    clock, delivery, link, writer = make(rate=1000.0, burst=1000, echo=True)
    link.verdicts["alice"] = UNKNOWN
    delivery.put(ALICE, "PRIVMSG", lines(3, "a"))
    delivery.put(ROOM, "PRIVMSG", ["for the room"])
    run(clock, link, writer, 0.1)
    assert [line for _, line in link.wire] == ["WHO alice", "PRIVMSG #ops :for the room"]   # nobody waits
    assert link.asked == ["alice"] and delivery.pending() == 3
    link.verdicts["alice"] = OK                          # the answer: still alice's
    writer.checked("alice")
    run(clock, link, writer, 0.1)
    assert [text for _, text in link.messages("alice")] == ["a0", "a1", "a2"]

    caplog.set_level(logging.INFO, "bot.transports.irc")
    link.verdicts["alice"] = CHANGED                     # someone else took the nick meanwhile
    delivery.put(ALICE, "PRIVMSG", lines(30, "x"))
    run(clock, link, writer, 0.1)
    assert [text for _, text in link.messages("alice")] == ["a0", "a1", "a2"]
    assert delivery.pending() == 0
    drops = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert drops == ["testnet: dropped 30 line(s) queued for alice: the nick is someone else's now"]   # once


def test_a_who_goes_with_two_tokens_so_the_line_it_releases_follows_its_answer_at_once() -> None:
    # alice shares no channel with the bot: before her lines go, the server is asked who has
    # her nick; its answer counts for the line it released and those written with it, until
    # the writer next waits (a paced backlog: a WHO and a line per two tokens)
    clock, delivery, link, writer = make(rate=1.0, burst=5, echo=True)
    link.unwatched.add("alice")
    delivery.put(ALICE, "PRIVMSG", lines(6, "a"))
    start = clock.now
    while clock.now < start + 10:
        link.answer()                                    # echoes
        before = len(link.wire)
        pause = writer.step()
        if any(line.startswith("WHO ") for _, line in link.wire[before:]):
            clock.now += RTT
            writer.checked("alice")                      # the server: still alice's
            continue
        clock.now += pause.seconds if pause.seconds is not None else 0.25
    sent = [(round(when - start, 3), line) for when, line in link.wire if not line.startswith("PING")]
    assert [line for _, line in sent] == ["WHO alice", *(f"PRIVMSG alice :a{i}" for i in range(4)),
                                          "WHO alice", "PRIVMSG alice :a4", "WHO alice", "PRIVMSG alice :a5"]
    assert [when for when, _ in sent] == pytest.approx([0, *[RTT] * 4, 2, 2 + RTT, 4, 4 + RTT], abs=2 * RTT)
    assert delivery.pending() == 0


def test_lines_follow_a_nick_change_and_are_dropped_when_the_person_quits(caplog: pytest.LogCaptureFixture) -> None:
    clock, delivery, link, writer = make(rate=1.0, burst=2, echo=True)
    delivery.put(ALICE, "PRIVMSG", lines(6, "a"))
    delivery.put(BOB, "PRIVMSG", lines(6, "b"))
    run(clock, link, writer, 0.5)
    delivery.person_renamed("alice", "alice_away", "alice_away")
    run(clock, link, writer, 4)
    to_alice = [text for _, text in link.messages("alice")]
    to_away = [text for _, text in link.messages("alice_away")]
    assert to_alice + to_away == lines(len(to_alice) + len(to_away), "a") and to_away
    delivery.person_gone("bob", "they quit")
    run(clock, link, writer, 20)
    assert len(link.messages("bob")) < 6 and delivery.pending() == 0
    assert any("dropped" in r.getMessage() and "they quit" in r.getMessage() for r in caplog.records)


def test_a_channel_the_bot_left_takes_its_lines_and_its_ops_lines_with_it() -> None:
    clock, delivery, link, writer = make(rate=1.0, burst=1, echo=True)
    delivery.put(ROOM, "PRIVMSG", lines(5))
    delivery.put(Dest("@#ops", "@#ops"), "PRIVMSG", lines(5))
    delivery.put(Dest("#other", "#other"), "PRIVMSG", lines(2))
    delivery.channel_left("#ops", "the bot was kicked from the channel")
    run(clock, link, writer, 10)
    assert {line.split(" ")[1] for _, line in link.wire} == {"#other"} and delivery.pending() == 0


def test_a_nick_that_is_gone_drops_its_lines() -> None:
    clock, delivery, link, writer = make(rate=10.0, burst=5, echo=True)
    link.verdicts["alice"] = GONE
    delivery.put(ALICE, "PRIVMSG", lines(3))
    run(clock, link, writer, 1)
    assert link.messages() == [] and delivery.pending() == 0


# -- the roster: who holds a nick ----------------------------------------------------------------------

def roster(*caps: str, whox: bool = True) -> tuple[Clock, Roster]:
    clock = Clock()
    view = Roster(clock)
    view.caps = set(caps)
    view.whox = whox
    view.joined_channel("#ops")
    return clock, view


def test_someone_in_a_shared_channel_is_checked_from_what_the_server_keeps_telling() -> None:
    _, view = roster("account-notify", "extended-join")
    view.joined_by("alice", "alice@host.example", "#ops", "alice", known=True)
    assert view.verify("alice", "alice", None) == OK
    assert view.verify("Alice", None, "alice@host.example") == OK               # casefolded
    view.account_changed("alice", None)                                          # logged out
    assert view.verify("alice", "alice", None) == CHANGED
    view.account_changed("alice", "alice")
    view.renamed("alice", "alice_away")
    assert view.verify("alice_away", "alice", None) == OK
    assert view.verify("alice", "alice", None) == UNKNOWN                        # not watched: ask
    view.left("alice_away", "#ops")                                              # no shared channel left
    assert view.verify("alice_away", "alice", None) == UNKNOWN


def test_a_nick_the_bot_cannot_watch_counts_only_on_a_fresh_who_answer() -> None:
    clock, view = roster("account-notify")
    assert view.verify("bob", "bob", None) == UNKNOWN
    assert view.ask("bob") == "WHO bob %tcuhna,471"
    assert view.ask("bob") is None                                               # on its way already
    view.who_reply("*", "bob", "bob@h", "bob", known=True)
    assert view.who_end("bob")
    assert view.verify("bob", "bob", None, answered=True) == OK
    assert view.verify("bob", "bob", None) == UNKNOWN                            # stale at once
    assert view.verify("bob", "eve", None, answered=True) == CHANGED
    clock.now += 20
    assert view.ask("bob") is not None
    assert view.who_end("bob")                                                   # no reply line: nobody
    assert view.verify("bob", "bob", None, answered=True) == GONE


def test_without_whox_a_services_account_cannot_be_checked_but_a_user_at_host_can() -> None:
    _, view = roster(whox=False)
    assert view.ask("carol") == "WHO carol"
    view.who_reply("#elsewhere", "carol", "carol@h")                            # plain WHO: no account
    assert view.who_end("carol")
    assert view.verify("carol", "carol", None, answered=True) == UNCHECKABLE
    assert view.verify("carol", None, "carol@h", answered=True) == OK
    assert view.verify("carol", None, "mallory@h", answered=True) == CHANGED


def test_names_and_who_on_join_tell_who_shares_the_channel() -> None:
    _, view = roster("account-notify")
    view.prefixes = "~&@%+"
    view.names("#ops", ["@dave", "+erin", "frank"])
    view.names("#elsewhere", ["gina"])                                           # not ours
    assert set(view.people) == {"dave", "erin", "frank"}
    view.who_reply("#ops", "dave", "dave@h", "dave", known=True)
    assert view.verify("dave", "dave", None) == OK and view.account_of("dave") == "dave"
    view.left_channel("#ops")
    assert view.people == {}


async def test_an_answer_to_a_person_is_bound_to_what_the_server_vouched_for_when_they_asked() -> None:
    transport = IrcTransport(IrcConfig(name="testnet", host="127.0.0.1", nick="releasebot", tls=False))
    await transport.send(Identity("irc", "testnet", "Alice", account="alice", verified_by=VERIFIED_SERVICES,
                                  hostmask="Alice!al@host.example"), "by account")
    await transport.send(Identity("irc", "testnet", "bob", hostmask="bob!~bob@build.example.org"), "by host")
    await transport.send(Identity("irc", "testnet", "carol"), "by nick")        # allow_hostmask: false
    await transport.send(Room("irc", "testnet", "#Ops"), "to the room")
    assert transport.delivery.lanes.targets() == {
        Dest("alice", "Alice", True, account="alice"), Dest("bob", "bob", True, userhost="~bob@build.example.org"),
        Dest("carol", "carol", True), Dest("#ops", "#Ops")}
    assert [d.bound for d in sorted(transport.delivery.lanes.targets(), key=lambda d: d.key)] == [
        False, True, True, False]
