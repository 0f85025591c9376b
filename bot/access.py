"""Users, their verified identities per network, and roles per project.

An identity is matched to a user only by what the server vouches for
(IRC services account on that network, XMPP bare JID, the local console).
IRC account names belong to one network (anyone may register "alice" on
another), so IRC identities are configured per network.  An IRC hostmask
pattern counts only where that user's entry explicitly allows it, and the
match is reported as weaker.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

from bot.chat import (UNVERIFIED, VERIFIED_CONSOLE, VERIFIED_HOSTMASK, VERIFIED_JID,
                      VERIFIED_SERVICES, Identity)

log = logging.getLogger(__name__)

ADMINS = "admins"          # the role that may do everything, everywhere
GLOBAL = "*"               # roles granted on every project


@dataclass(frozen=True)
class IrcIds:
    """A user's identities on one IRC network (account names are per network)."""

    accounts: tuple[str, ...] = ()
    hostmasks: tuple[str, ...] = ()         # explicit, weaker fallback


@dataclass(frozen=True)
class User:
    name: str
    irc: dict[str, IrcIds] = field(default_factory=dict)    # IRC network name -> identities there
    xmpp_jids: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    roles: dict[str, frozenset[str]] = field(default_factory=dict)   # project -> roles

    def roles_on(self, project: str | None) -> frozenset[str]:
        """Roles on ``project`` and every parent (``Foo:Bar`` inherits ``Foo``), plus global ones."""
        granted = set(self.roles.get(GLOBAL, ()))
        if project:
            parts = project.split(":")
            for i in range(1, len(parts) + 1):
                granted |= self.roles.get(":".join(parts[:i]), frozenset())
        return frozenset(granted)

    def has_role(self, role: str, project: str | None = None) -> bool:
        roles = self.roles_on(project)
        return ADMINS in roles or role in roles


@dataclass(frozen=True)
class Caller:
    """The outcome of resolving an identity: who, and how sure we are."""

    identity: Identity
    user: User | None
    how: str

    def describe(self) -> str:
        ident = self.identity
        if self.user is None:
            if ident.account:
                return (f"{ident.handle} on {ident.network}: account {ident.account!r} "
                        f"({ident.verified_by}) is not a known user")
            return f"{ident.handle} on {ident.network}: not identified ({ident.verified_by})"
        roles = ", ".join(f"{p}: {'/'.join(sorted(r))}" for p, r in sorted(self.user.roles.items()))
        return (f"{ident.handle} on {ident.network} is {self.user.name}, verified by {self.how}"
                f"; roles: {roles or 'none'}")


class Directory:
    """Resolves identities to users.  Built from users.yaml by ``bot.config``."""

    def __init__(self, users: list[User]) -> None:
        self.users = {u.name: u for u in users}
        self._irc = {(net, a.casefold()): u for u in users for net, ids in u.irc.items() for a in ids.accounts}
        self._xmpp = {j.lower(): u for u in users for j in u.xmpp_jids}

    def resolve(self, ident: Identity) -> Caller:
        if ident.protocol == "console":
            user = self.users.get(ident.account or "")
            return Caller(ident, user, VERIFIED_CONSOLE if user else UNVERIFIED)
        if ident.protocol == "irc":
            if ident.account and ident.verified_by == VERIFIED_SERVICES:
                user = self._irc.get((ident.network, ident.account.casefold()))
                if user:
                    return Caller(ident, user, VERIFIED_SERVICES)
            if ident.hostmask:
                for user in self.users.values():
                    ids = user.irc.get(ident.network)
                    if ids and any(fnmatch.fnmatchcase(ident.hostmask.lower(), pat.lower())
                                   for pat in ids.hostmasks):
                        return Caller(ident, user, VERIFIED_HOSTMASK)
            return Caller(ident, None, ident.verified_by)
        if ident.protocol == "xmpp" and ident.account and ident.verified_by == VERIFIED_JID:
            user = self._xmpp.get(ident.account.lower())
            return Caller(ident, user, VERIFIED_JID if user else ident.verified_by)
        return Caller(ident, None, ident.verified_by)
