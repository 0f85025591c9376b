"""Capability negotiation (CAP LS 302 / REQ / ACK / NAK / NEW / DEL) and the
bot's own SASL PLAIN login, done by hand: the ``irc`` library's SASL registers
reactor-global handlers and its asyncio connection has none.

CAP LS goes out before NICK/USER, so the server holds registration until
CAP END and SASL can finish first.  When the server offers no SASL while
the bot registers (services down or still linking), the bot goes on without
its account, asks CAP LS again every ``sasl_recheck`` seconds (besides
listening for CAP NEW: InspIRCd 3 lists ``sasl`` again once services link
but announces nothing, measured) and logs in after registration once SASL is
offered.  A server that refuses that gets a clean reconnect to log in while
registering (``Owner.relogin`` decides how often).
"""
from __future__ import annotations

import asyncio
import base64
import logging
from typing import Callable, Protocol

from bot.logsafety import sanitise
from bot.transports.irc.config import IrcConfig

log = logging.getLogger(__name__)

SASL_LATE_TIMEOUT = 30.0        # a login after registration not answered by then counts as refused
CHUNK = 400                     # AUTHENTICATE payload bytes per line


class Link(Protocol):
    """What negotiation needs of its connection."""

    registered: asyncio.Event
    quitting: str | None

    def write(self, line: str) -> None:
        """Now, before registration (no pacing)."""

    def write_secret(self, line: str) -> None:
        """Now, and never through any code that might log it."""

    def queue_control(self, line: str) -> None:
        """After registration: paced, ahead of messages."""


class Owner(Protocol):
    """The transport: it holds the bot's account across connections."""

    account: str | None

    def relogin(self, negotiation: "Negotiation", why: str) -> None:
        """SASL after registration did not work."""


class Negotiation:
    """One connection's capabilities and SASL state."""

    def __init__(self, config: IrcConfig, link: Link, owner: Owner, clock: Callable[[], float]) -> None:
        self.config = config
        self.link = link
        self.owner = owner
        self.clock = clock
        self.offered: dict[str, str | None] = {}
        self.caps: set[str] = set()
        self.cap_ended = False
        self.sasl_started = False                     # SASL tried while registering
        self.ls_fresh = False                         # a CAP LS re-check is under way: forget the old list
        self.late_sasl: str | None = None             # after registration: requested | authenticating | done | failed
        self.late_sasl_since = 0.0
        self.next_sasl_check = 0.0

    # -- CAP ------------------------------------------------------------------------------

    def on_cap(self, args: list[str]) -> None:
        if not args:
            return
        sub, more = args[0].upper(), len(args) >= 3 and args[1] == "*"
        caps = args[-1].split()
        cfg = self.config
        if sub == "LS":
            if self.ls_fresh:
                self.offered.clear()
                self.ls_fresh = False
            self._offer(caps)
            if more:
                return
            if self.cap_ended:                      # the answer to a re-check after registration
                self.try_late_sasl()
                return
            want = [c for c in cfg.request_caps if c in self.offered]
            if self.wants_sasl():
                if self.offers_sasl_plain():
                    want.append("sasl")
                else:
                    log.warning("%s: the server offers no SASL PLAIN (services down or still linking?); "
                                "continuing without logging in as %s until it does", cfg.name, cfg.sasl_account)
                    if "cap-notify" in self.offered:    # implied by CAP LS 302; asked for if listed
                        want.append("cap-notify")
            if want:
                self.link.write("CAP REQ :" + " ".join(want))
            else:
                self.end_cap()
        elif sub == "ACK":
            for cap in caps:
                if cap.startswith("-"):
                    self.caps.discard(cap[1:])
                else:
                    self.caps.add(cap)
            if more:
                return
            if self.cap_ended:
                if "sasl" in caps and self.late_sasl == "requested":
                    self._late_authenticate()
                return
            if "sasl" in self.caps and not self.sasl_started:
                self.sasl_started = True
                self.link.write("AUTHENTICATE PLAIN")
            else:
                self.end_cap()
        elif sub == "NAK":
            if self.cap_ended and "sasl" in caps and self.late_sasl == "requested":
                self.owner.relogin(self, "CAP REQ sasl refused")
                return
            log.warning("%s: the server refused capabilities %s", cfg.name, sanitise(" ".join(caps)))
            self.end_cap()
        elif sub == "NEW":
            self._offer(caps)
            names = [c.partition("=")[0] for c in caps]
            want = [c for c in names if c in cfg.request_caps and c not in self.caps]
            if want and self.cap_ended:
                self.link.queue_control("CAP REQ :" + " ".join(want))
            if "sasl" in names:
                self.try_late_sasl()
        elif sub == "DEL":
            for cap in caps:
                self.caps.discard(cap)
                self.offered.pop(cap, None)

    def _offer(self, caps: list[str]) -> None:
        for cap in caps:
            key, _, value = cap.partition("=")
            self.offered[key] = value or None

    def end_cap(self) -> None:
        if not self.cap_ended:
            self.cap_ended = True
            self.link.write("CAP END")

    def recheck(self) -> None:
        """Ask for the server's capabilities again (SASL may be offered now)."""
        self.ls_fresh = True
        self.link.queue_control("CAP LS 302")

    # -- SASL -----------------------------------------------------------------------------

    def wants_sasl(self) -> bool:
        cfg = self.config
        return bool(cfg.sasl_account and cfg.sasl_password) and self.owner.account is None

    def offers_sasl_plain(self) -> bool:
        if "sasl" not in self.offered:
            return False
        mechs = self.offered["sasl"]
        return mechs is None or "PLAIN" in mechs.upper().split(",")

    def may_recheck(self, now: float) -> bool:
        """Whether it is time to ask CAP LS again for a login that could not happen."""
        return (self.wants_sasl() and not self.sasl_started and self.late_sasl is None
                and bool(self.offered) and now >= self.next_sasl_check)

    def late_overdue(self, now: float) -> bool:
        return self.late_sasl in ("requested", "authenticating") and now - self.late_sasl_since >= SASL_LATE_TIMEOUT

    def try_late_sasl(self) -> None:
        """Log in after registration, once the server offers SASL (IRCv3 allows
        it; InspIRCd 3 does it).  Only when it was not offered while registering:
        a refusal then (a wrong password) stands."""
        if (not self.link.registered.is_set() or not self.wants_sasl() or self.sasl_started
                or self.late_sasl is not None or self.link.quitting is not None or not self.offers_sasl_plain()):
            return
        log.info("%s: the server offers SASL now; logging in as %s", self.config.name, self.config.sasl_account)
        self.late_sasl_since = self.clock()
        if "sasl" in self.caps:
            self._late_authenticate()
        else:
            self.late_sasl = "requested"
            self.link.queue_control("CAP REQ :sasl")

    def _late_authenticate(self) -> None:
        self.late_sasl = "authenticating"
        self.late_sasl_since = self.clock()
        self.link.queue_control("AUTHENTICATE PLAIN")

    def on_refused(self, kind: str, target: str, args: list[str]) -> None:
        """A server that does not take SASL after registration: 421 for
        AUTHENTICATE or CAP, 462, or FAIL AUTHENTICATE (standard replies)."""
        if self.late_sasl not in ("requested", "authenticating"):
            return
        words = [target.upper(), *(a.upper() for a in args[:1])]
        if kind == "alreadyregistered" or "AUTHENTICATE" in words or "CAP" in words:
            self.owner.relogin(self, f"{kind} {sanitise(' '.join(args), 80)}")

    def on_authenticate(self, target: str) -> None:
        if target != "+":
            return
        cfg = self.config
        payload = base64.b64encode(f"\0{cfg.sasl_account}\0{cfg.sasl_password}".encode("utf-8")).decode()
        chunks = [payload[i:i + CHUNK] for i in range(0, len(payload), CHUNK)]
        if not chunks or len(chunks[-1]) == CHUNK:
            chunks.append("+")
        for chunk in chunks:
            self.link.write_secret(f"AUTHENTICATE {chunk}")

    def on_loggedin(self, args: list[str]) -> None:
        account = args[1] if len(args) > 1 else "?"
        self.owner.account = account
        log.info("%s: logged in as %s", self.config.name, account)

    def on_success(self) -> None:
        if self.late_sasl == "authenticating":
            self.late_sasl = "done"
        self.end_cap()

    def on_failed(self, args: list[str]) -> None:
        if self.late_sasl in ("requested", "authenticating"):
            # After registration a refusal may only mean "not now": ask again while registering.
            self.owner.relogin(self, sanitise(" ".join(args[-1:])))
            return
        log.error("%s: SASL login as %s failed (%s); continuing without an account", self.config.name,
                  self.config.sasl_account, sanitise(" ".join(args)))
        self.owner.account = None
        self.end_cap()

    def on_welcome(self) -> None:
        self.cap_ended = True
        cfg = self.config
        if cfg.sasl_account and cfg.sasl_password and not self.sasl_started and "sasl" in self.offered:
            log.error("%s: registered without logging in as %s", cfg.name, cfg.sasl_account)
        elif cfg.sasl_account and cfg.sasl_password and not self.offered:
            log.error("%s: the server does not negotiate capabilities; no SASL login as %s",
                      cfg.name, cfg.sasl_account)
