"""Single-use reply addresses: ``bot+k7qd2m9xw4ab@example.org``.

Every mail the bot sends a user carries one as its reply address.  A reply to
it, from that user's configured address, before it expires, is that user: a
``From`` header alone proves nothing, but only the user was sent the token.

The token is 12 characters from ``secrets`` over lower-case letters and
digits (62 bits; MTAs may change the case of a local part, so matching
ignores it), and ``bot+`` plus the token stays far below the 64-octet
local-part limit.  Each token is a row in ``email_tokens`` (``schema``):
user, purpose, what it refers to, expiry and first use.  A ``thread`` token
serves every reply in its thread until it expires; a ``question`` token is
spent by its first valid answer, and the row's CHECK makes a second spend
fail the whole commit it is part of, so two answers racing cannot both count.

Issuing and spending return ``Op``s, to be committed with the mail that
carries the address or with what the answer causes (``schema``).
"""
from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from typing import Callable, Collection, Mapping

from bot.transports.email.schema import Op, Storage

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
LENGTH = 12
PURPOSES = ("thread", "question")
_TOKEN = re.compile(rf"^[a-z0-9]{{{LENGTH}}}$")

Clock = Callable[[], float]


@dataclass(frozen=True)
class TokenVerdict:
    """A valid reply address (``user``, ``purpose``, ``ref``), or the ``rule``
    it broke (unknown, another_user, replayed, expired, spent) and a ``reason``
    for the log line."""

    ok: bool
    token: str = ""
    user: str = ""
    purpose: str = ""
    ref: str = ""
    rule: str = ""
    reason: str = ""


class ReplyTokens:
    """The reply addresses of one bot address (``bot@example.org``)."""

    def __init__(self, storage: Storage, address: str, clock: Clock = time.time) -> None:
        local, at, domain = address.strip().lower().rpartition("@")
        if not at or not local or "+" in local or not domain:
            raise ValueError(f"reply tokens: {address!r} is not a plain address like bot@example.org")
        self.local, self.domain = local, domain
        self._storage = storage
        self._clock = clock

    def address(self, token: str) -> str:
        return f"{self.local}+{token}@{self.domain}"

    def token_of(self, address: str) -> str | None:
        """The token in ``address`` if it is one of this bot's reply addresses (any case)."""
        local, _, domain = address.strip().lower().rpartition("@")
        base, plus, token = local.partition("+")
        if domain != self.domain or base != self.local or not plus or not _TOKEN.match(token):
            return None
        return token

    def issue(self, user: str, purpose: str, ref: str, lifetime: float) -> tuple[str, list[Op]]:
        """A new reply address for ``user`` and the ops that create it (commit them
        with the mail that carries it, or before it is sent)."""
        if purpose not in PURPOSES:
            raise ValueError(f"reply tokens: purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}")
        if lifetime <= 0:
            raise ValueError("reply tokens: the lifetime must be positive")
        token = "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))
        now = self._clock()
        op = self._storage.op("INSERT INTO email_tokens (token, user, purpose, ref, created, expires) "
                              "VALUES (?, ?, ?, ?, ?, ?)", token, user, purpose, ref, now, now + lifetime)
        return self.address(token), [op]

    async def check(self, addresses: Collection[str], sender: str | None,
                    users: Mapping[str, Collection[str]]) -> TokenVerdict | None:
        """The verdict on the first of ``addresses`` (a mail's recipients) that is
        a reply address, for a mail from ``sender``; None when there is none.
        ``users`` maps each user to their configured addresses."""
        tokens = [t for t in (self.token_of(a) for a in addresses) if t is not None]
        if not tokens:
            return None
        token = tokens[0]
        row = await self._storage.query_one("SELECT user, purpose, ref, expires, used_at FROM email_tokens "
                                            "WHERE token = ?", token)
        if row is None:
            return TokenVerdict(False, token, rule="unknown", reason=f"reply address {self.address(token)} "
                                                                     "is unknown")
        user, purpose, ref, expires, used_at = row
        owner = user_of(sender, users)
        verdict = TokenVerdict(False, token, str(user), str(purpose), str(ref))
        if owner is not None and owner != user:
            return _refuse(verdict, "another_user", f"reply address issued to {user}, mail from {owner}")
        if owner is None:
            return _refuse(verdict, "replayed", f"reply address issued to {user}, mail from "
                                                f"{sender or 'no address'}, not an address of theirs")
        if self._clock() >= float(expires):
            return _refuse(verdict, "expired", f"reply address expired {_ago(self._clock() - float(expires))} ago")
        if purpose == "question" and used_at is not None:
            return _refuse(verdict, "spent", "question already answered through this reply address")
        return TokenVerdict(True, token, str(user), str(purpose), str(ref))

    def spend(self, token: str, key: str) -> Op:
        """The op that records a valid use by the mail with idempotency ``key``.
        Commit it with the use's effect: for a question token a second spend
        fails that commit (the row's CHECK), so the effect is not written either."""
        return self._storage.op("UPDATE email_tokens SET uses = uses + 1, used_at = COALESCE(used_at, ?), "
                                "used_by = COALESCE(used_by, ?) WHERE token = ?", self._clock(), key, token)

    def prune(self, older_than: float) -> Op:
        """Forget tokens that expired more than ``older_than`` seconds ago (until
        then a late reply is told "expired", not "unknown")."""
        return self._storage.op("DELETE FROM email_tokens WHERE expires < ?", self._clock() - older_than)


def user_of(sender: str | None, users: Mapping[str, Collection[str]]) -> str | None:
    """The user one of whose configured addresses ``sender`` is (case ignored), or None."""
    if not sender:
        return None
    wanted = sender.lower()
    for user, addresses in users.items():
        if any(a.lower() == wanted for a in addresses):
            return user
    return None


def _refuse(verdict: TokenVerdict, rule: str, reason: str) -> TokenVerdict:
    return TokenVerdict(False, verdict.token, verdict.user, verdict.purpose, verdict.ref, rule, reason)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{int(seconds)}s"
    if seconds < 7200:
        return f"{int(seconds // 60)}min"
    if seconds < 172800:
        return f"{int(seconds // 3600)}h"
    return f"{int(seconds // 86400)}d"
