"""An email network's entry in bot.yaml: ``EmailConfig`` and its checker.

The outgoing half: which SMTP server (a submission server: the bot is a mail
client, not a relay), how it is secured, who the bot logs in as and writes
from.  The password comes from the variable ``password_env`` names and is
never in the file, a log or a ``repr``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from email.headerregistry import Address
from typing import ClassVar

from bot.network import is_loopback
from bot.transports.email.message import mailbox
from engine.configkit import Section

SECURITY = ("starttls", "tls", "plaintext")
#: The usual submission ports: 587 with STARTTLS (RFC 6409), 465 with TLS from
#: the first byte (RFC 8314), 25 for plaintext (a local relay on loopback only).
DEFAULT_PORTS = {"starttls": 587, "tls": 465, "plaintext": 25}
KEYS = ("name", "smtp_host", "smtp_port", "security", "user", "password_env", "from", "ca_file", "timeout",
        "helo", "idle_timeout", "reply_address", "token_lifetime", "imap", "listen", "trust")
IMAP_KEYS = ("host", "port", "user", "password_env", "tls", "ca_file", "mailbox", "processed_folder",
             "poll_interval")
LISTEN_KEYS = ("host", "port", "addresses", "max_size", "sender_rate", "window", "hostname")
TRUST_KEYS = ("authserv_id", "domains")
_HELO_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-[]:")


@dataclass(frozen=True)
class EmailConfig:
    protocol: ClassVar[str] = "email"
    name: str                           # the network name in logs and targets ("mail")
    smtp_host: str
    sender: Address                     # ``from``: the bot's address (MAIL FROM and the From header)
    smtp_port: int | None = None        # default by security: 587 / 465 / 25
    security: str = "starttls"          # starttls | tls | plaintext (loopback only)
    user: str | None = None             # AUTH as this user ...
    # ... with this password, from the environment; None without ``user``, or for
    # ``check`` without the variable set (the transport then refuses to start).
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None          # a CA bundle trusted besides the system's; always verified
    timeout: float = 30.0               # connecting, and waiting for each answer of the server
    helo: str | None = None             # the name in EHLO; default: this machine's FQDN
    idle_timeout: float = 5.0           # an idle connection is closed after this long
    command_prefix: str = "!"
    # mail in (bot/transports/email/receiver.py): any of the two ways, or none (mail out only)
    reply_address: str = ""             # bot@example.org: single-use reply addresses are bot+<token>@...
    token_lifetime: float = 30 * 86400.0   # a thread's reply address (a question's lasts until its deadline)
    imap: "ImapIn | None" = None
    listen: "ListenIn | None" = None
    trust: "TrustIn | None" = None

    @property
    def receives(self) -> bool:
        return self.imap is not None or self.listen is not None

    @property
    def port(self) -> int:
        return self.smtp_port if self.smtp_port is not None else DEFAULT_PORTS[self.security]


@dataclass(frozen=True)
class ImapIn:
    host: str
    user: str
    password: str | None = field(repr=False)
    port: int | None = None             # default 993 with TLS, 143 without (loopback only)
    tls: bool = True
    ca_file: str | None = None
    mailbox: str = "INBOX"
    processed_folder: str | None = "Processed"   # "" in bot.yaml: flag handled mail instead of moving it
    poll_interval: float = 60.0


@dataclass(frozen=True)
class ListenIn:
    addresses: tuple[str, ...]          # the bot's own addresses (bot+token@ forms are accepted too)
    host: str = "127.0.0.1"
    port: int = 2525
    max_size: int = 1_000_000
    sender_rate: int = 30
    window: float = 60.0
    hostname: str = "localhost"


@dataclass(frozen=True)
class TrustIn:
    authserv_id: str                    # the receiving MTA whose Authentication-Results count
    domains: tuple[str, ...]            # the From domains it may vouch for


def _helo_problem(value: str) -> str | None:
    if value and set(value) <= _HELO_CHARS:
        return None
    return "expected a host name like mail.example.org (or an address literal like [192.0.2.1])"


def _from_problem(value: str) -> str | None:
    parsed = mailbox(value)
    return parsed if isinstance(parsed, str) else None


def parse_config(section: Section) -> EmailConfig | None:
    """One ``protocol: email`` entry of bot.yaml's ``networks`` (without its
    ``protocol`` key).  Every problem goes to ``section.findings`` with its line;
    None when there was one."""
    s = section
    problems_before = len(s.findings.problems)
    s.check_keys(KEYS, secrets={"password": "password_env"})
    s.require("name", "smtp_host", "from")
    name = s.get("name", str, None, lambda v: None if v.strip() else "must not be empty")
    host = s.get("smtp_host", str, None,
                 lambda v: None if v.strip() and v.isprintable() and " " not in v else "expected a host name")
    port = s.get("smtp_port", int, None, lambda v: None if 0 < v < 65536 else "expected 1..65535")
    security = s.get("security", str, "starttls",
                     lambda v: None if v in SECURITY else f"expected one of {', '.join(SECURITY)}")
    sender = s.get("from", str, None, _from_problem)
    user = s.get("user", str, None, lambda v: None if v.strip() and v.isprintable() else "must not be empty")
    ca_file = s.get("ca_file", str, None, lambda v: None if os.path.isfile(v) else "no such file")
    helo = s.get("helo", str, None, _helo_problem)
    timeout = s.duration("timeout", 30.0, minimum=1.0,
                         why="how long to wait for the server; less fails healthy servers under load")
    idle = s.duration("idle_timeout", 5.0)
    if security == "plaintext" and host is not None and not is_loopback(host):
        s.problem("security", f"security: plaintext is only allowed to a loopback host (localhost, 127.0.0.1, "
                              f"::1), not {host!r}: mail and password would cross the network unencrypted")
    if ca_file is not None and security == "plaintext":
        s.problem("ca_file", "ca_file: needs security: starttls or tls (a CA is only used to check a TLS server)")
    if "user" in s and "password_env" not in s:
        s.problem("user", "user: needs password_env (the variable holding the password)")
    if "password_env" in s and "user" not in s:
        s.problem("password_env", "password_env: needs user (who logs in with that password)")
    # Missing: a problem at start, a warning (and a config without password) for check.
    password = s.secret("password_env") if "password_env" in s else None

    reply_address = s.get("reply_address", str, None, _plain_address)
    token_lifetime = s.duration("token_lifetime", 30 * 86400.0, minimum=60.0)
    imap = _imap(s)
    listen = _listen(s)
    trust = _trust(s)
    if trust is not None and imap is None and listen is None:
        s.problem("trust", "trust: there is no mail in (imap or listen) for it to vouch for")

    if len(s.findings.problems) > problems_before or name is None or host is None or sender is None:
        return None
    parsed = mailbox(sender)
    assert isinstance(parsed, Address)     # _from_problem passed
    return EmailConfig(name=name, smtp_host=host, sender=parsed, smtp_port=port, security=security, user=user,
                       password=password, ca_file=ca_file, timeout=timeout, helo=helo, idle_timeout=idle,
                       reply_address=(reply_address or parsed.addr_spec).lower(), token_lifetime=token_lifetime,
                       imap=imap, listen=listen, trust=trust)


def _plain_address(value: str) -> str | None:
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or "+" in local or any(c.isspace() or c in "<>\"()," for c in value):
        return "expected a plain address like bot@example.org (no +, no display name)"
    return None


def _imap(s: Section) -> ImapIn | None:
    if "imap" not in s:
        return None
    i = Section(s.raw("imap"), s.file, s.findings, label=s.label, line=s.line("imap"), what="imap")
    i.check_keys(IMAP_KEYS, secrets={"password": "password_env"}, what="imap")
    i.require("host", "user", "password_env")
    host = i.get("host", str, None, lambda v: None if v.strip() and " " not in v else "expected a host name")
    user = i.get("user", str, None, lambda v: None if v.strip() else "must not be empty")
    port = i.get("port", int, None, lambda v: None if 0 < v < 65536 else "expected 1..65535")
    tls = i.get("tls", bool, True)
    ca_file = i.get("ca_file", str, None, lambda v: None if os.path.isfile(v) else "no such file")
    box = i.get("mailbox", str, "INBOX", _folder)
    processed = i.get("processed_folder", str, "Processed", lambda v: None if v == "" else _folder(v))
    poll = i.duration("poll_interval", 60.0, minimum=1.0)
    if not tls and host is not None and not is_loopback(host):
        i.problem("tls", f"tls: false is only allowed to a loopback host, not {host!r}: the password would "
                         "cross the network unencrypted")
    if processed and processed == box:
        i.problem("processed_folder", "processed_folder: must differ from the mailbox it watches")
    password = i.secret("password_env") if "password_env" in i else None
    if host is None or user is None:
        return None
    return ImapIn(host, user, password, port, tls, ca_file, box, processed or None, poll)


def _folder(value: str) -> str | None:
    return None if value and value.isascii() and value.isprintable() else "expected a printable ASCII folder name"


def _listen(s: Section) -> ListenIn | None:
    if "listen" not in s:
        return None
    sub = s.sub("listen", LISTEN_KEYS, "listen")
    sub.require("addresses")
    host = sub.get("host", str, "127.0.0.1", lambda v: None if v.strip() and " " not in v else "expected an address")
    port = sub.get("port", int, 2525, lambda v: None if 0 <= v < 65536 else "expected 0..65535")
    addresses = sub.names("addresses", "the bot's own addresses (a list)")
    for address in addresses:
        problem = _plain_address(address)
        if problem:
            sub.problem("addresses", f"addresses: {address!r}: {problem}")
    max_size = sub.get("max_size", int, 1_000_000, lambda v: None if 1000 <= v <= 100_000_000 else "1000 to 100000000")
    rate = sub.get("sender_rate", int, 30, lambda v: None if v >= 1 else "at least 1")
    window = sub.duration("window", 60.0, minimum=1.0)
    hostname = sub.get("hostname", str, "localhost", _helo_problem)
    return ListenIn(tuple(a.lower() for a in addresses), host, port, max_size, rate, window, hostname)


def _trust(s: Section) -> TrustIn | None:
    if "trust" not in s:
        return None
    t = s.sub("trust", TRUST_KEYS, "trust")
    t.require("authserv_id", "domains")
    authserv = t.get("authserv_id", str, None,
                     lambda v: None if v.strip() and " " not in v else "expected the receiving host's id, "
                     "as it writes it in Authentication-Results (e.g. mx.example.org)")
    domains = t.names("domains", "the From domains it may vouch for (a list)")
    if authserv is None or not domains:
        return None
    return TrustIn(authserv, tuple(d.lower() for d in domains))
