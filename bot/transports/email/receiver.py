"""Mail in, end to end: the ways in (IMAP watcher, SMTP listener) write each
mail to the durable inbox; one worker takes the inbox's mail in order, reads
it, decides who sent it, and hands the front-end's handler one ``Message``.

Exactly once.  Every ``Message`` made from a mail carries the mail's
"handled" mark (``Message.commit_with``) and, for a reply to a single-use
address, the op that spends it (``Message.spend``).  The router and the
commands write them in the commit of the command's effect (a launch, an
answer) or, for a command that changes nothing, with its reply: a mail's
effect and its mark are one commit, so a SIGKILL at any point never runs a
mailed command twice and never loses one.  The mail's key (its Message-ID,
else IMAP UIDVALIDITY:UID) makes a mail accepted twice one row.

What a mail becomes:

* a loop, an auto-reply or a bounce: handled here, never answered;
* refused (a forged or unverified sender, a bad reply address): a ``Message``
  with ``refusal`` set; the router tells the user the From address claims,
  if any, at their configured address, once;
* a reply to a question's address: ``answer q7 <first line> <the rest>``;
* anything else from a user: the command in the subject, else the first
  line of the body that is not quoted; ``help`` when nothing parses.
"""
from __future__ import annotations

import asyncio
import logging
import time
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

from bot.chat import (UNVERIFIED, VERIFIED_MAIL_DOMAIN, VERIFIED_MAIL_TOKEN, Identity, Message,
                      MessageHandler)
from bot.transports.email.config import EmailConfig
from bot.transports.email.imap import FetchedMail, ImapSettings, ImapWatcher
from bot.transports.email.inbound import Inbox, InboxRow, Refused, Sender, describe, identify
from bot.transports.email.listener import ListenerSettings, MailListener, Received
from bot.transports.email.parse import parse
from bot.transports.email.schema import Storage
from bot.transports.email.tokens import ReplyTokens
from bot.transports.email.verify import Trust

log = logging.getLogger(__name__)


class MailIn:
    """The incoming half of one email network (module docstring)."""

    def __init__(self, config: EmailConfig, storage: Storage, users: Mapping[str, Collection[str]],
                 is_command: Callable[[str], bool], clock: Callable[[], float] = time.time,
                 rate: tuple[int, float] = (5, 10.0)) -> None:
        self.config = config
        self.network = config.name
        self.storage = storage
        self.users = users
        self.is_command = is_command
        self.clock = clock
        self.inbox = Inbox(storage, clock)
        self.tokens = ReplyTokens(storage, config.reply_address, clock)
        trust = config.trust
        self.trust = Trust.of(trust.authserv_id, trust.domains) if trust is not None else None
        own = {config.reply_address, config.sender.addr_spec.lower()}
        if config.listen is not None:
            own |= set(config.listen.addresses)
        self.own = tuple(sorted(own))
        self._handler: MessageHandler | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.listener: MailListener | None = None
        self.watcher: ImapWatcher | None = None
        self.handled = 0
        self.rate = rate
        self._recent: dict[str, list[float]] = {}

    # -- the ways in ------------------------------------------------------------------------

    async def start(self, handler: MessageHandler) -> None:
        self._handler = handler
        loop = asyncio.get_running_loop()
        listen, imap = self.config.listen, self.config.imap
        if listen is not None:
            self.listener = MailListener(ListenerSettings(
                addresses=self.own, host=listen.host, port=listen.port, max_size=listen.max_size,
                rate=listen.sender_rate, window=listen.window, hostname=listen.hostname), self._received)
            await self.listener.start()
            log.info("email %s: listening for mail on %s:%d for %s", self.network, listen.host, self.listener.port,
                     ", ".join(self.own))
        if imap is not None:
            if imap.password is None:
                raise ValueError(f"email {self.network}: imap: no password (password_env is not set)")
            self.watcher = ImapWatcher(ImapSettings(
                host=imap.host, user=imap.user, password=imap.password,
                port=imap.port if imap.port is not None else (993 if imap.tls else 143), tls=imap.tls,
                ca_file=None if imap.ca_file is None else Path(imap.ca_file),
                mailbox=imap.mailbox, processed=imap.processed_folder, poll_interval=imap.poll_interval),
                self._fetched)
            self._tasks.append(loop.create_task(self.watcher.run(), name=f"imap-{self.network}"))
        self._tasks.append(loop.create_task(self._work(), name=f"mail-in-{self.network}"))
        self._wake.set()                  # mail that arrived while the bot was down

    async def stop(self) -> None:
        log.debug("email %s: mail in stopping", self.network)
        if self.listener is not None:
            await self.listener.stop()
        if self.watcher is not None:
            await self.watcher.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        log.debug("email %s: mail in stopped", self.network)

    async def _received(self, mail: Received) -> None:
        """The listener's accept: durable before its 250."""
        await self.inbox.accept("smtp", mail.raw, envelope_from=mail.mail_from, envelope_to=mail.rcpt_tos)
        self._wake.set()

    async def _fetched(self, mail: FetchedMail) -> None:
        """The IMAP watcher's: durable before the mail is moved to the processed folder."""
        await self.inbox.accept("imap", mail.raw, fallback_key=mail.key)
        self._wake.set()

    # -- the worker -------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                rows = await self.inbox.pending(limit=100)
            except Exception:
                log.exception("email %s: cannot read the inbox; trying again", self.network)
                await asyncio.sleep(1.0)
                self._wake.set()
                continue
            # one sender's mails in the order they came, different senders' side by side
            # (their commits then share a sync to disk)
            by_sender: dict[str, list[InboxRow]] = {}
            for row in rows:
                by_sender.setdefault(_sender_key(row), []).append(row)
            await asyncio.gather(*(self._handle_all(group) for group in by_sender.values()))
            if len(rows) == 100:
                self._wake.set()

    async def _handle_all(self, rows: list[InboxRow]) -> None:
        for row in rows:
            await self._pace(_sender_key(row))
            await self._handle(row)

    async def _pace(self, sender: str) -> None:
        """At most ``rate`` mails of one sender per ``window`` become commands (as
        chat's per-user limit); the rest wait their turn in the inbox, never dropped."""
        count, window = self.rate
        times = self._recent.setdefault(sender, [])
        while True:
            now = time.monotonic()
            times[:] = [t for t in times if now - t < window]
            if len(times) < count:
                times.append(now)
                return
            await asyncio.sleep(window - (now - times[0]) + 0.01)

    async def _handle(self, row: InboxRow) -> None:
        try:
            # the bot's own mail is told by its addresses (and the Auto-Submitted it always
            # carries), never by a Message-ID's domain: the users' clients share that domain
            mail = parse(row.raw, is_command=self.is_command, own_addresses=self.own,
                         envelope_from=row.envelope_from if row.source == "smtp" else None)
            who = await identify(mail, row.envelope_to, self.tokens, self.trust, self.users)
            log.info("email %s: %s", self.network, describe(mail, row.key, who))
            handled = self.inbox.handled(row.id, who.user if isinstance(who, Sender) else f"refused: {who.rule}")
            thread = f"<{mail.message_id}>" if mail.message_id else ""
            if isinstance(who, Refused):
                if who.rule == "loop":                    # never answered: just handled
                    await self.storage.write(handled)
                    return
                message = Message(Identity("email", self.network, mail.sender or "unknown", account=who.reply_to_user,
                                           verified_by=UNVERIFIED), "", commit_with=(handled,), thread=thread,
                                  refusal=who.reason)
            else:
                text = mail.command or "help"
                if who.purpose == "question":
                    qid, _, _name = who.ref.partition(":")
                    text = f"answer q{qid} {(mail.answer or '').strip()} {mail.comment.strip()}".strip()
                identity = Identity("email", self.network, (mail.sender or "").lower(), account=who.user,
                                    verified_by=VERIFIED_MAIL_TOKEN if who.mailbox else VERIFIED_MAIL_DOMAIN)
                spend = (self.tokens.spend(who.token, row.key),) if who.token else ()
                message = Message(identity, text, commit_with=(handled,), spend=spend, thread=thread)
            assert self._handler is not None
            await self._handler(message)
            self.handled += 1
            still = await self.storage.query_one("SELECT handled FROM email_inbox WHERE id = ?", row.id)
            if still is not None and not still[0]:      # nothing wrote its mark: do not take it again
                log.error("email %s: mail %s was not marked handled by its command; marking it now",
                          self.network, row.key)
                await self.storage.write(handled)
        except Exception:
            # a mail that breaks the bot must not stop every mail after it
            log.exception("email %s: mail %s could not be handled; it is set aside", self.network, row.key)
            try:
                await self.storage.write(self.inbox.handled(row.id, "internal error"))
            except Exception:
                log.exception("email %s: cannot set mail %s aside", self.network, row.key)

    def issue_token(self, user: str, purpose: str, ref: str, expires: float) -> tuple[str, list[Any]]:
        """A single-use reply address for a mail to ``user`` (the outbox calls this)."""
        lifetime = self.config.token_lifetime if purpose == "thread" else max(60.0, expires - self.clock())
        return self.tokens.issue(user, purpose, ref, lifetime)


def _sender_key(row: InboxRow) -> str:
    """Whose mail this is, for ordering: the envelope sender, else the From header (IMAP)."""
    if row.source == "smtp" and row.envelope_from:
        return row.envelope_from.lower()
    try:
        headers = BytesHeaderParser(policy=compat32).parsebytes(row.raw[:65536])
        return str(headers.get("From", "")).lower()[:200]
    except Exception:
        return ""
