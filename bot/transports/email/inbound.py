"""Incoming mail, from accepted to handled: the durable inbox, and who sent it.

The inbox.  Both ways in write each mail to ``email_inbox`` (``schema``)
before they let go of it: the SMTP listener before it answers ``250``, the
IMAP watcher before it moves the mail to the processed folder.  An accepted
mail is never lost, and a mail accepted twice (a client retrying after a lost
``250``, a crash between the commit and the move) is one row: the idempotency
key is its Message-ID, else the IMAP UIDVALIDITY:UID, else a digest of the
bytes.  The dispatcher reads ``pending`` rows and commits ``handled(...)``
with the mail's effect, so the effect happens once: a second ``handled`` for
the same row fails its commit.

Who sent it.  ``identify`` decides whether a mail is from a user, in one of
exactly two ways: a reply to a single-use address (``tokens``), or a trusted
receiving host's verdict (``verify``) on a From address that is a user's.
Everything else is refused with the reason.  A refusal names the user the
From address claims to be, if any, so that at most one reply goes to that
user's configured address, never to the From of an unverified mail.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Collection, Mapping

from bot.logsafety import sanitise
from bot.transports.email.parse import Mail, message_id_of
from bot.transports.email.schema import Op, Storage
from bot.transports.email.tokens import ReplyTokens, user_of
from bot.transports.email.verify import Trust, verify

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True)
class InboxRow:
    id: int
    key: str
    source: str                 # imap | smtp
    envelope_from: str | None
    envelope_to: tuple[str, ...]
    raw: bytes
    received: float


class Inbox:
    """The ``email_inbox`` table (module docstring)."""

    def __init__(self, storage: Storage, clock: Clock = time.time) -> None:
        self._storage = storage
        self._clock = clock

    @staticmethod
    def key_for(raw: bytes, fallback: str | None = None) -> str:
        """``mid:<Message-ID>``, else ``fallback`` (``imap:<uidvalidity>:<uid>``), else ``sha256:<hex>``."""
        message_id = message_id_of(raw)
        if message_id:
            return f"mid:{message_id}"
        return fallback or "sha256:" + hashlib.sha256(raw).hexdigest()

    async def accept(self, source: str, raw: bytes, *, fallback_key: str | None = None,
                     envelope_from: str | None = None, envelope_to: Collection[str] = ()) -> str | None:
        """Write the mail, durably when this returns, under its key (``key_for``),
        and return the key; None if a mail with this key was already accepted
        (nothing is written)."""
        key = self.key_for(raw, fallback_key)
        known = await self._storage.query_one("SELECT 1 FROM email_inbox WHERE key = ?", key)
        if known is not None:
            return None
        await self._storage.write(self._storage.op(
            "INSERT INTO email_inbox (key, source, envelope_from, envelope_to, raw, received) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO NOTHING",
            key, source, envelope_from, ",".join(envelope_to), raw, self._clock()))
        return key

    async def pending(self, limit: int = 100) -> list[InboxRow]:
        """Accepted mail not yet handled, oldest first."""
        rows = await self._storage.query(
            "SELECT id, key, source, envelope_from, envelope_to, raw, received FROM email_inbox "
            "WHERE handled = 0 ORDER BY id LIMIT ?", limit)
        return [InboxRow(int(r[0]), str(r[1]), str(r[2]), r[3], tuple(a for a in str(r[4]).split(",") if a),
                         bytes(r[5]), float(r[6])) for r in rows]

    def handled(self, row_id: int, outcome: str) -> Op:
        """The op that marks a mail handled; commit it with the mail's effect.
        The raw bytes are dropped, the key stays to recognise a repeat."""
        return self._storage.op("UPDATE email_inbox SET handled = handled + 1, handled_at = ?, outcome = ?, "
                                "raw = X'' WHERE id = ?", self._clock(), outcome[:500], row_id)

    async def count(self) -> tuple[int, int]:
        """(pending, handled), for tests and the status line."""
        row = await self._storage.query_one("SELECT COALESCE(SUM(handled = 0), 0), COALESCE(SUM(handled), 0) "
                                            "FROM email_inbox")
        return (int(row[0]), int(row[1])) if row else (0, 0)


# -- who sent it -------------------------------------------------------------

@dataclass(frozen=True)
class Sender:
    """A mail from ``user``, verified ``how``.  ``mailbox`` is True only for a
    reply address: a domain's verdict does not say which mailbox sent the mail,
    so it never answers an approval.  ``token`` and ``purpose``/``ref`` are the
    reply address's (spend it with the effect: ``ReplyTokens.spend``)."""

    user: str
    how: str
    mailbox: bool
    token: str = ""
    purpose: str = ""
    ref: str = ""


@dataclass(frozen=True)
class Refused:
    """Not from a user: ``reason`` for the log line; ``rule`` names the check
    that failed; ``reply_to_user`` is the user the From address claims (at most
    one reply goes to their configured address), None when no reply may go
    (auto-replies, bounces, the bot's own mail, strangers)."""

    rule: str
    reason: str
    reply_to_user: str | None = None


async def identify(mail: Mail, envelope_to: Collection[str], tokens: ReplyTokens | None, trust: Trust | None,
                   users: Mapping[str, Collection[str]]) -> Sender | Refused:
    """Who sent ``mail`` (module docstring).  ``envelope_to`` are the SMTP
    recipients when known (the listener); ``users`` maps each user to the
    addresses configured for them."""
    if mail.never_answer:
        return Refused("loop", f"never answered: {mail.never_answer}")
    if mail.refused:
        return Refused("refused", mail.refused, user_of(mail.sender, users))
    claimed = user_of(mail.sender, users)
    recipients = [*envelope_to, *mail.recipients]
    verdict = await tokens.check(recipients, mail.sender, users) if tokens is not None else None
    if verdict is not None:
        if not verdict.ok:
            return Refused(f"token_{verdict.rule}", verdict.reason, claimed)
        how = f"a reply to your single-use address for {verdict.purpose} {verdict.ref}"
        return Sender(verdict.user, how, True, verdict.token, verdict.purpose, verdict.ref)
    domain = verify(mail.auth_results, mail.sender_domain, trust)
    if not domain.ok:
        return Refused("unverified", "not verified: no single-use reply address, and " + domain.reason, claimed)
    if claimed is None:
        return Refused("unknown_sender", f"{mail.sender} is no user's address ({domain.how})")
    return Sender(claimed, domain.how, False)


def describe(mail: Mail, key: str, outcome: Sender | Refused) -> str:
    """The one log line for a mail: its key, sender, subject and what became of it."""
    who = (f"from {outcome.user} ({outcome.how})" if isinstance(outcome, Sender)
           else f"refused [{outcome.rule}]: {outcome.reason}")
    notes = f" ({', '.join(mail.notes)})" if mail.notes else ""
    return sanitise(f"mail {key} <{mail.sender or mail.sender_problem}> {mail.subject!r}{notes}: {who}", 400)
