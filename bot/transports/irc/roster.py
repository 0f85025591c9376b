"""One connection's view of the network: who shares a channel with the bot,
from which user@host, logged in as which services account; and, for nicks
that share no channel, what a WHO query last said about them.

Without IRCv3 ``account-tag`` this is how the bot knows who is talking
(``account_of``); with it, it is still how the bot checks, before a private
line leaves, that its nick is still held by the person who asked (``verify``):
an answer queued by nick must not reach whoever took the nick meanwhile.

What the server keeps us told about (a user in a shared channel: JOIN, PART,
KICK, QUIT, NICK, and ``account-notify`` for logins) stays current.  Anything
else is stale as soon as it is learnt: a nick that shares no channel with the
bot can change hands unseen, so a WHO answer about it counts only for the
lines written right after it (``delivery.Writer`` says which).
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Callable

from bot.transports.irc.text import Fold, casefolder

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 15.0            # a WHO not answered by then is asked again
WHOX_TOKEN = "471"
WHOX_FIELDS = "%tcuhna"         # replies: token channel user host nick account

# Verdicts of ``verify``
OK = "ok"                       # still the person who asked
CHANGED = "changed"             # someone else holds the nick now
GONE = "gone"                   # nobody does
UNKNOWN = "unknown"             # ask the server first (``ask``)
UNCHECKABLE = "uncheckable"     # the server cannot tell us (no WHOX, no account tracking)


@dataclass
class Person:
    """Someone in a channel with the bot (kept current by the server's events)."""

    userhost: str | None = None          # user@host
    account: str | None = None           # services account; None: logged out
    account_known: bool = False          # learnt from extended-join, WHOX, account-notify or a tag
    channels: set[str] = field(default_factory=set)
    nick: str = ""                       # as the server last wrote it


@dataclass(frozen=True)
class Seen:
    """What a WHO answer (or a message) said about a nick, and when."""

    at: float
    online: bool
    userhost: str | None = None
    account: str | None = None
    account_known: bool = False


class Roster:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.fold: Fold = casefolder("rfc1459")
        self.caps: set[str] = set()              # the connection's acknowledged capabilities (shared)
        self.whox = False
        self.prefixes = "@+"                     # ISUPPORT PREFIX symbols (in NAMES replies)
        self.joined: set[str] = set()            # folded channels the bot is in
        self.people: dict[str, Person] = {}      # folded nick -> someone sharing a channel
        self.seen: dict[str, Seen] = {}          # folded nick -> what the last WHO about it answered
        self.asked: dict[str, float] = {}        # folded nick -> when a WHO about it went out

    # -- what the server tells us --------------------------------------------------------

    def tracks_accounts(self) -> bool:
        """Whether logins and logouts of people in shared channels reach us."""
        return "account-notify" in self.caps

    def joined_channel(self, channel: str) -> None:
        self.joined.add(self.fold(channel))

    def left_channel(self, channel: str) -> None:
        """The bot left (or was kicked from) ``channel``: its members are only
        tracked as far as they share another channel with it."""
        chan = self.fold(channel)
        self.joined.discard(chan)
        for nick in list(self.people):
            self.people[nick].channels.discard(chan)
            if not self.people[nick].channels:
                del self.people[nick]

    def joined_by(self, nick: str, userhost: str | None, channel: str, account: str | None = None,
                  known: bool = False) -> None:
        """Someone joined a shared channel; ``known``: the JOIN said which
        account (extended-join; None: logged out)."""
        person = self._person(nick)
        person.channels.add(self.fold(channel))
        if userhost:
            person.userhost = userhost
        person.account, person.account_known = (account, True) if known else (None, False)

    def names(self, channel: str, nicks: list[str]) -> None:
        """A NAMES reply: who is in a channel we are in (nicks only)."""
        chan = self.fold(channel)
        if chan not in self.joined:
            return
        for raw in nicks:
            nick = raw.lstrip(self.prefixes).split("!", 1)[0]
            if nick:
                self._person(nick).channels.add(chan)

    def who_reply(self, channel: str, nick: str, userhost: str | None, account: str | None = None,
                  known: bool = False) -> None:
        """One line of a WHO (``known`` False: a plain WHO, which shows no account)
        or WHOX answer (``account`` None: logged out)."""
        key = self.fold(nick)
        chan = self.fold(channel)
        if chan in self.joined:
            self._person(nick).channels.add(chan)
        person = self.people.get(key)
        if person is not None:
            person.userhost = userhost or person.userhost
            if known:
                person.account, person.account_known = account, True
        if key in self.asked:          # an answer to our question (not a channel's member list)
            self.seen[key] = Seen(self.clock(), True, userhost, account, known)

    def who_end(self, mask: str) -> bool:
        """End of a WHO list; True when it answered a question about a nick.
        A nick that got no reply line is not online."""
        key = self.fold(mask)
        asked = self.asked.pop(key, None)
        if asked is None:
            return False
        seen = self.seen.get(key)
        if seen is None or seen.at < asked:
            self.seen[key] = Seen(self.clock(), False)
        return True

    def account_changed(self, nick: str, account: str | None) -> None:
        person = self.people.get(self.fold(nick))
        if person is not None:
            person.account, person.account_known = account, True
        self.seen.pop(self.fold(nick), None)

    def spoke(self, nick: str, userhost: str | None, account: str | None = None, known: bool = False) -> None:
        """A message from someone in a shared channel: its prefix is news of
        who holds the nick (``known``: with account-tag, which tells its account)."""
        person = self.people.get(self.fold(nick))
        if person is not None:
            person.userhost = userhost or person.userhost
            if known:
                person.account, person.account_known = account, True

    def renamed(self, old: str, new: str) -> None:
        """``old`` is now ``new`` (a NICK seen in a shared channel)."""
        old_key, new_key = self.fold(old), self.fold(new)
        self.seen.pop(old_key, None)
        self.seen.pop(new_key, None)
        person = self.people.pop(old_key, None)
        if person is not None:
            person.nick = new
            self.people[new_key] = person
        elif old_key != new_key:
            self.people.pop(new_key, None)

    def left(self, nick: str, channel: str) -> None:
        key = self.fold(nick)
        person = self.people.get(key)
        if person is None:
            return
        person.channels.discard(self.fold(channel))
        if not person.channels:       # no shared channel: we would hear of no change any more
            del self.people[key]

    def quit(self, nick: str) -> None:
        key = self.fold(nick)
        self.people.pop(key, None)
        self.seen.pop(key, None)

    def _person(self, nick: str) -> Person:
        key = self.fold(nick)
        person = self.people.get(key)
        if person is None:
            person = self.people[key] = Person(nick=nick)
        return person

    # -- questions -------------------------------------------------------------------------

    def account_of(self, nick: str) -> str | None:
        """Without account-tag: the account tracked for someone in a shared
        channel, trusted only while account-notify keeps it current."""
        person = self.people.get(self.fold(nick))
        if person is None or not self.tracks_accounts():
            return None
        return person.account

    def verify(self, nick: str, account: str | None, userhost: str | None, *, answered: bool = False,
               more_accounts: tuple[str, ...] = ()) -> str:
        """Whether ``nick`` is still held by who asked: logged in as ``account``
        (or one of ``more_accounts``: a person may have several; services
        accounts compare without case) or, without one, connected from
        ``userhost``.  OK, CHANGED (someone else holds it), GONE (nobody),
        UNKNOWN (ask the server: ``ask``) or UNCHECKABLE.  ``answered``: the
        server just answered a WHO about it; otherwise only what stays current
        counts (someone in a shared channel)."""
        key = self.fold(nick)
        person = self.people.get(key)
        wanted = {a.casefold() for a in (account, *more_accounts) if a is not None}
        if person is not None:
            if account is not None and person.account_known and self.tracks_accounts():
                return OK if person.account is not None and person.account.casefold() in wanted else CHANGED
            if account is None and person.userhost is not None:
                return OK if person.userhost == userhost else CHANGED
        seen = self.seen.get(key)
        if not answered or seen is None or self.clock() - seen.at > CHECK_TIMEOUT:
            return UNKNOWN
        if not seen.online:
            return GONE
        if account is not None:
            if not seen.account_known:
                return UNCHECKABLE
            return OK if seen.account is not None and seen.account.casefold() in wanted else CHANGED
        if seen.userhost is None:
            return UNCHECKABLE
        return OK if seen.userhost == userhost else CHANGED

    def holder(self, accounts: tuple[str, ...], hostmasks: tuple[str, ...] = (), hint: str = ""
               ) -> tuple[str, str | None, str | None] | None:
        """The nick to reach a person by, from what stays current (people in a
        shared channel), as ``(nick, account, userhost)``: one logged into one
        of ``accounts`` (only while account-notify keeps logins current); else,
        only if ``hostmasks`` are given, one whose nick!user@host matches one
        (the weaker fallback users.yaml may allow).  Chosen deterministically:
        ``hint`` (where they were last seen) first, then in the order of
        ``accounts`` or ``hostmasks``, a nick that is the account's name first,
        then by casefolded nick.  None: nobody is verified as theirs now."""
        hint_key = self.fold(hint) if hint else None
        if accounts and self.tracks_accounts():
            order = {a.casefold(): i for i, a in reversed(list(enumerate(accounts)))}
            by_account = [((key != hint_key, order[p.account.casefold()], key != self.fold(p.account), key),
                           (p.nick or key, p.account, None))
                          for key, p in self.people.items()
                          if p.account_known and p.account is not None and p.account.casefold() in order]
            if by_account:
                return min(by_account, key=lambda item: item[0])[1]
        if hostmasks:
            by_mask = [((key != hint_key, i, key), (p.nick or key, None, p.userhost))
                       for key, p in self.people.items() if p.userhost is not None
                       for i, pattern in enumerate(hostmasks)
                       if fnmatch.fnmatchcase(f"{p.nick or key}!{p.userhost}".lower(), pattern.lower())]
            if by_mask:
                return min(by_mask, key=lambda item: item[0])[1]
        return None

    def ask(self, nick: str) -> str | None:
        """The WHO line to send about ``nick``, unless one is already on its way."""
        key = self.fold(nick)
        now = self.clock()
        if now - self.asked.get(key, now - CHECK_TIMEOUT) < CHECK_TIMEOUT:
            return None
        if len(self.seen) + len(self.asked) > 256:     # only fresh answers count: forget the rest
            self.seen = {k: v for k, v in self.seen.items() if now - v.at <= CHECK_TIMEOUT}
            self.asked = {k: t for k, t in self.asked.items() if now - t < CHECK_TIMEOUT}
        self.asked[key] = now
        return f"WHO {nick} {WHOX_FIELDS},{WHOX_TOKEN}" if self.whox else f"WHO {nick}"

    def who_channel(self, channel: str) -> str:
        return f"WHO {channel} {WHOX_FIELDS},{WHOX_TOKEN}"
