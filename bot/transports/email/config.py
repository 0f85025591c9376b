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
        "helo", "idle_timeout")
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
    # Every network gets ``commands.prefix`` (bot/config.py); used once mail carries commands.
    command_prefix: str = "!"

    @property
    def port(self) -> int:
        return self.smtp_port if self.smtp_port is not None else DEFAULT_PORTS[self.security]


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

    if len(s.findings.problems) > problems_before or name is None or host is None or sender is None:
        return None
    parsed = mailbox(sender)
    assert isinstance(parsed, Address)     # _from_problem passed
    return EmailConfig(name=name, smtp_host=host, sender=parsed, smtp_port=port, security=security, user=user,
                       password=password, ca_file=ca_file, timeout=timeout, helo=helo, idle_timeout=idle)
