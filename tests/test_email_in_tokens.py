"""Single-use reply addresses (tokens.py), the durable inbox and who sent a
mail (inbound.py), on a real SQLite store with the email front-end's tables."""
from __future__ import annotations

import re

import pytest

from bot.transports.email.inbound import Inbox, Refused, Sender, describe, identify
from bot.transports.email.parse import parse
from bot.transports.email.tokens import LENGTH, ReplyTokens
from bot.transports.email.verify import Trust
from engine.participant_runtime import Storage
from engine.store import StoreError

USERS = {"alice": ["alice@example.org"], "bob": ["Bob@Example.org", "bob@home.example"]}
TRUST = Trust.of("mx.example.org", ["example.org"])
DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tokens(email_storage: Storage, clock: Clock) -> ReplyTokens:
    return ReplyTokens(email_storage, "bot@example.org", clock)


async def issued(tokens: ReplyTokens, storage: Storage, user: str = "alice", purpose: str = "thread",
                 ref: str = "#12") -> str:
    address, ops = tokens.issue(user, purpose, ref, lifetime=7 * DAY)
    await storage.write(*ops)
    return address


def reply(to: str, sender: str = "alice@example.org", extra: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: Re: Build #12\r\nMessage-ID: <r1@example.org>\r\n{extra}"
            "\r\nstatus 12\r\n").encode()


def read(raw: bytes):  # type: ignore[no-untyped-def]
    return parse(raw, is_command=lambda t: t.startswith("status"), own_addresses=("bot@example.org",))


async def test_an_issued_address_is_short_random_lower_case_and_checks_out(tokens: ReplyTokens,
                                                                          email_storage: Storage) -> None:
    addresses = {await issued(tokens, email_storage) for _ in range(20)}
    assert len(addresses) == 20
    for address in addresses:
        assert re.fullmatch(rf"bot\+[a-z0-9]{{{LENGTH}}}@example\.org", address)
        assert len(address.split("@")[0]) <= 20                      # far below 64 octets
    address = sorted(addresses)[0]
    verdict = await tokens.check([address.upper()], "ALICE@example.org", USERS)   # MTAs may change case
    assert verdict is not None and verdict.ok and (verdict.user, verdict.purpose, verdict.ref) == ("alice", "thread", "#12")
    assert await tokens.check(["bot@example.org", "alice@example.org"], "alice@example.org", USERS) is None


async def test_an_unknown_token_is_refused(tokens: ReplyTokens) -> None:
    verdict = await tokens.check(["bot+aaaaaaaaaaaa@example.org"], "alice@example.org", USERS)
    assert verdict is not None and (verdict.ok, verdict.rule) == (False, "unknown")
    # not ours at all: another domain, another base, a malformed token
    for other in ("bot+aaaaaaaaaaaa@evil.test", "robot+aaaaaaaaaaaa@example.org", "bot+short@example.org"):
        assert await tokens.check([other], "alice@example.org", USERS) is None


async def test_each_refusal_names_its_rule(tokens: ReplyTokens, email_storage: Storage, clock: Clock) -> None:
    address = await issued(tokens, email_storage, "alice", "question", "approval 7")
    another = await tokens.check([address], "bob@home.example", USERS)
    assert another is not None and another.rule == "another_user"
    assert another.reason == "reply address issued to alice, mail from bob"
    replayed = await tokens.check([address], "mallory@evil.test", USERS)
    assert replayed is not None and replayed.rule == "replayed" and "mallory@evil.test" in replayed.reason
    clock.now += 7 * DAY
    expired = await tokens.check([address], "alice@example.org", USERS)
    assert expired is not None and expired.rule == "expired" and expired.reason == "reply address expired 0s ago"
    clock.now -= 1
    valid = await tokens.check([address], "alice@example.org", USERS)
    assert valid is not None and valid.ok
    await email_storage.write(tokens.spend(valid.token, "mid:a1@example.org"))
    spent = await tokens.check([address], "alice@example.org", USERS)
    assert spent is not None and spent.rule == "spent"


async def test_a_question_token_is_spent_once_even_when_two_answers_race(tokens: ReplyTokens,
                                                                         email_storage: Storage) -> None:
    """Both answers pass ``check`` before either commits: the second commit fails
    whole, so its effect (here a row in the inbox) is not written either."""
    address = await issued(tokens, email_storage, "alice", "question", "approval 7")
    inbox = Inbox(email_storage)
    await inbox.accept("smtp", b"Message-ID: <a>\r\n\r\nyes")
    await inbox.accept("smtp", b"Message-ID: <b>\r\n\r\nno")
    first, second = await inbox.pending()
    v1 = await tokens.check([address], "alice@example.org", USERS)
    v2 = await tokens.check([address], "alice@example.org", USERS)
    assert v1 is not None and v2 is not None and v1.ok and v2.ok
    await email_storage.write(tokens.spend(v1.token, first.key), inbox.handled(first.id, "answered yes"))
    with pytest.raises(StoreError):
        await email_storage.write(tokens.spend(v2.token, second.key), inbox.handled(second.id, "answered no"))
    assert [r.key for r in await inbox.pending()] == ["mid:b"]
    row = await email_storage.query_one("SELECT uses, used_by FROM email_tokens WHERE token = ?", v1.token)
    assert row == (1, "mid:a")


async def test_a_thread_token_serves_every_reply_until_it_expires(tokens: ReplyTokens, email_storage: Storage,
                                                                   clock: Clock) -> None:
    address = await issued(tokens, email_storage)
    for n in range(3):
        verdict = await tokens.check([address], "alice@example.org", USERS)
        assert verdict is not None and verdict.ok
        await email_storage.write(tokens.spend(verdict.token, f"mid:{n}"))
    row = await email_storage.query_one("SELECT uses, used_by FROM email_tokens")
    assert row == (3, "mid:0")
    clock.now += 8 * DAY
    await email_storage.write(tokens.prune(older_than=0.5 * DAY))
    gone = await tokens.check([address], "alice@example.org", USERS)
    assert gone is not None and gone.rule == "unknown"


async def test_bad_arguments_are_refused(email_storage: Storage) -> None:
    for address in ("bot", "bot+x@example.org", "@example.org"):
        with pytest.raises(ValueError):
            ReplyTokens(email_storage, address)
    tokens = ReplyTokens(email_storage, "bot@example.org")
    with pytest.raises(ValueError, match="purpose"):
        tokens.issue("alice", "approval", "x", 60)
    with pytest.raises(ValueError, match="lifetime"):
        tokens.issue("alice", "thread", "x", 0)
    with pytest.raises(StoreError):                      # the CHECK on purpose
        await email_storage.write(email_storage.op(
            "INSERT INTO email_tokens (token, user, purpose, ref, created, expires) VALUES "
            "('x', 'a', 'approval', 'r', 0, 1)"))


# -- the inbox ---------------------------------------------------------------------------

async def test_the_inbox_keeps_one_row_per_key_until_handled(email_storage: Storage) -> None:
    inbox = Inbox(email_storage)
    one = b"Subject: x\r\nMessage-ID: <m1@x>\r\n\r\none"
    assert Inbox.key_for(one) == Inbox.key_for(one, "imap:5:9") == "mid:m1@x"
    assert Inbox.key_for(b"Subject: x\r\n\r\none", "imap:5:9") == "imap:5:9"
    assert Inbox.key_for(b"Message-ID: <a@x>\r\nMessage-ID: <b@x>\r\n\r\n").startswith("sha256:")
    assert await inbox.accept("smtp", one, envelope_from="alice@example.org", envelope_to=["bot@example.org"]) \
        == "mid:m1@x"
    assert await inbox.accept("imap", one.replace(b"one", b"again"), fallback_key="imap:5:9") is None
    [row] = await inbox.pending()
    assert (row.key, row.source, row.raw, row.envelope_from, row.envelope_to) == \
        ("mid:m1@x", "smtp", one, "alice@example.org", ("bot@example.org",))
    await email_storage.write(inbox.handled(row.id, "launched #3"))
    assert await inbox.pending() == [] and await inbox.count() == (0, 1)
    with pytest.raises(StoreError):                      # handled twice: the second commit fails
        await email_storage.write(inbox.handled(row.id, "launched #4"))
    assert await inbox.accept("smtp", one) is None             # a retry after the 250 was lost


# -- who sent it -------------------------------------------------------------------------

async def test_a_reply_to_a_single_use_address_is_its_user(tokens: ReplyTokens, email_storage: Storage) -> None:
    address = await issued(tokens, email_storage, "bob", "thread", "#12")
    who = await identify(read(reply(address, "bob@home.example")), (), tokens, None, USERS)
    assert isinstance(who, Sender) and (who.user, who.mailbox, who.ref) == ("bob", True, "#12")
    assert who.how == "a reply to your single-use address for thread #12"
    # the envelope recipient counts too (the To header may name a list)
    via_envelope = await identify(read(reply("team@example.org", "bob@home.example")), [address], tokens, None, USERS)
    assert isinstance(via_envelope, Sender) and via_envelope.user == "bob"


async def test_a_trusted_verdict_is_the_user_of_the_from_address_but_not_their_mailbox(tokens: ReplyTokens) -> None:
    raw = reply("bot@example.org", extra="Authentication-Results: mx.example.org; dmarc=pass header.from=example.org\r\n")
    who = await identify(read(raw), (), tokens, TRUST, USERS)
    assert isinstance(who, Sender) and (who.user, who.mailbox) == ("alice", False)
    assert who.how == "dmarc=pass for example.org by mx.example.org"


AR_PASS = "Authentication-Results: mx.example.org; dmarc=pass header.from=example.org\r\n"


@pytest.mark.parametrize("case, rule, reply_to", [
    ("forged From", "unverified", "alice"),
    ("untrusted host", "unverified", "alice"),
    ("trusted host lower down", "unverified", "alice"),
    ("expired token", "token_expired", "alice"),
    ("another user's token", "token_another_user", "bob"),
    ("spent question token", "token_spent", "alice"),
    ("token replayed from another address", "token_replayed", None),
    ("a stranger with a trusted verdict", "unknown_sender", None),
    ("an auto-reply", "loop", None),
    ("no From", "refused", None),
])
async def test_the_same_command_is_refused_for_each_reason(case: str, rule: str, reply_to: str | None,
                                                            tokens: ReplyTokens, email_storage: Storage,
                                                            clock: Clock) -> None:
    thread = await issued(tokens, email_storage, "alice", "thread", "#12")
    question = await issued(tokens, email_storage, "alice", "question", "approval 7")
    to, sender, extra, envelope = "bot@example.org", "alice@example.org", "", ()
    if case == "untrusted host":
        extra = "Authentication-Results: mx.evil.test; dmarc=pass header.from=example.org\r\n"
    elif case == "trusted host lower down":
        extra = "Authentication-Results: relay.example.net; none\r\n" + AR_PASS
    elif case == "expired token":
        to, clock.now = thread, clock.now + 8 * DAY
    elif case == "another user's token":
        to, sender = thread, "bob@example.org"
    elif case == "spent question token":
        to = question
        await email_storage.write(tokens.spend(tokens.token_of(question) or "", "mid:first"))
    elif case == "token replayed from another address":
        to, sender = thread, "mallory@evil.test"
    elif case == "a stranger with a trusted verdict":
        sender, extra = "carol@example.org", AR_PASS
    elif case == "an auto-reply":
        to, extra = thread, "Auto-Submitted: auto-replied\r\n"
    raw = reply(to, sender, extra)
    if case == "no From":
        raw = raw.replace(b"From: alice@example.org\r\n", b"")
    who = await identify(read(raw), envelope, tokens, TRUST, USERS)
    assert isinstance(who, Refused), who
    assert (who.rule, who.reply_to_user) == (rule, reply_to), who.reason


async def test_a_token_present_decides_even_with_a_trusted_verdict(tokens: ReplyTokens, email_storage: Storage,
                                                                    clock: Clock) -> None:
    """The address replied to says which check applies: an expired reply address
    is not rescued by the domain's verdict."""
    thread = await issued(tokens, email_storage)
    clock.now += 8 * DAY
    who = await identify(read(reply(thread, extra=AR_PASS)), (), tokens, TRUST, USERS)
    assert isinstance(who, Refused) and who.rule == "token_expired"


async def test_each_mail_is_one_log_line(tokens: ReplyTokens, email_storage: Storage) -> None:
    address = await issued(tokens, email_storage)
    m = read(reply(address).replace(b"Subject: Re: Build #12", b"Subject: =?utf-8?q?x=0A2026-01-01_CRITICAL_forged?="))
    line = describe(m, "mid:r1@example.org", await identify(m, (), tokens, None, USERS))
    assert "\n" not in line and "'x 2026-01-01 CRITICAL forged'" in line     # the newline folded away
    assert line.endswith("from alice (a reply to your single-use address for thread #12)")
    refused = read(b"Subject: status 1\r\n\r\nstatus 1\r\n")
    assert describe(refused, "sha256:ab", await identify(refused, (), tokens, TRUST, USERS)) == \
        "mail sha256:ab <no From header> 'status 1': refused [refused]: no usable sender: no From header"
