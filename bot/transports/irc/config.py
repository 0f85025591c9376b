"""An IRC network's entry in bot.yaml: ``IrcConfig``, and ``parse_config``
checking it through a ``engine.configkit.Section``."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import ClassVar

from engine.configkit import Section
from bot.network import is_loopback
from bot.outqueue import DEFAULT_MAX_PER_TARGET

# IRCv3 capabilities asked for when the server offers them (plus ``sasl`` when
# the bot has an account).  ``echo-message`` confirms each line the server
# processed, for free (see the delivery guarantee in ``delivery``).
DEFAULT_CAPS = ("account-tag", "message-tags", "account-notify", "extended-join", "echo-message")

# Measured against InspIRCd 3's DEFAULT connect class (threshold 10 s of
# penalty, 1 s of penalty per command, decaying at 1 command/s, RecvQ 4 KB):
# a sustained 1.0 line/s never accumulates fakelag; 1.2/s lagged 18 s after 150
# lines and 1.5/s 43 s, growing until "RecvQ exceeded" disconnects the bot.
# A burst of 5 stays well under the 10-command threshold.  Every line the bot
# writes after registration (JOIN, WHO, PING included) spends a token.
DEFAULT_RATE = 1.0
DEFAULT_BURST = 5
# Lines one target (a channel, a person) may have queued: ``ps all`` fits whole.
DEFAULT_MAX_QUEUED = DEFAULT_MAX_PER_TARGET
MIN_MAX_QUEUED = 10

KEYS = ("name", "host", "port", "tls", "tls_verify", "ca_file", "nick", "username", "realname", "sasl_account",
        "sasl_password_env", "channels", "command_prefix", "pacing_rate", "pacing_burst", "max_queued_lines",
        "reconnect_min", "reconnect_max", "allow_hostmask", "use_notice", "ping_interval", "ping_timeout")

_NICK = re.compile(r"^[A-Za-z\[\]\\`_^{|}][A-Za-z0-9\[\]\\`_^{|}-]*$")
_CHANNEL = re.compile(r"^[#&+!][^\s,\x07]+$")


@dataclass(frozen=True)
class IrcConfig:
    protocol: ClassVar[str] = "irc"
    name: str                                   # the network's name in the bot ("libera")
    host: str
    nick: str
    port: int | None = None                     # default: 6697 with TLS, 6667 without
    tls: bool = True
    tls_verify: bool = True                     # False: accept any certificate (a test server only)
    ca_file: str | None = None                  # PEM CA bundle trusted besides the system's CAs
    username: str | None = None                 # default: the nick
    realname: str = "release bot"
    sasl_account: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    channels: tuple[str, ...] = ()
    command_prefix: str = "!"
    pacing_rate: float = DEFAULT_RATE           # lines per second, sustained
    pacing_burst: int = DEFAULT_BURST
    max_queued_lines: int = DEFAULT_MAX_QUEUED  # per target; the rest of an answer becomes one note
    reconnect_min: float = 1.0                  # seconds; doubles per failed attempt ...
    reconnect_max: float = 300.0                # ... up to this, with jitter
    allow_hostmask: bool = True                 # False: never offer nick!user@host to the directory
    use_notice: bool = False                    # answer with NOTICE instead of PRIVMSG
    ping_interval: float = 60.0                 # PING the server after this much silence ...
    ping_timeout: float = 30.0                  # ... and drop the connection if it stays silent
    request_caps: tuple[str, ...] = DEFAULT_CAPS

    @property
    def server_port(self) -> int:
        return self.port if self.port is not None else (6697 if self.tls else 6667)


def parse_config(section: Section) -> IrcConfig | None:
    """One ``protocol: irc`` entry of bot.yaml's ``networks`` (without its
    ``protocol`` key).  Every problem goes to ``section.findings`` with its
    line; None when there was one.  The SASL password comes from the variable
    named by ``sasl_password_env``: unset, it is a warning for ``check`` (the
    config then has no password) and a problem when the bot starts."""
    s = section
    problems_before = len(s.findings.problems)
    s.check_keys(KEYS, secrets={"sasl_password": "sasl_password_env"})
    name = s.get("name", str, None, lambda v: None if v.strip() else "must not be empty", required=True)
    host = s.get("host", str, None, lambda v: None if v.strip() and " " not in v else "a host name or address",
                 required=True)
    port = s.get("port", int, None, lambda v: None if 0 < v < 65536 else "expected 1-65535")
    tls = s.get("tls", bool, True)
    tls_verify = s.get("tls_verify", bool, True)
    ca_file = s.get("ca_file", str, None, lambda v: None if os.path.isfile(v) else "no such file")
    if ca_file is not None and tls is False:
        s.problem("ca_file", "ca_file: needs tls: true (a CA is only used to check a TLS server)")
    nick = s.get("nick", str, None, lambda v: None if _NICK.match(v) else "not a valid IRC nick", required=True)
    username = s.get("username", str, None, lambda v: None if re.match(r"^[^\s@!:]+$", v) else
                     "no spaces, '@', '!' or ':'")
    realname = s.get("realname", str, "release bot", lambda v: None if "\n" not in v and "\r" not in v else
                     "one line")
    account = s.get("sasl_account", str, None, lambda v: None if v.strip() and " " not in v else "one word")
    password = None
    if "sasl_password_env" in s:
        password = s.secret("sasl_password_env")
        if account is None and "sasl_account" not in s:
            account = nick
        if tls is False and host is not None and not is_loopback(host):
            s.problem("sasl_password_env", "sasl_password_env: SASL PLAIN sends the password readable by anyone "
                                           "on the way; needs tls: true (plain text only to a loopback host)")
    elif account is not None:
        s.problem("sasl_account", "sasl_account: needs sasl_password_env (the variable holding its password)")
    channels = s.get("channels", list, [])
    good_channels: list[str] = []
    for ch in channels:
        if isinstance(ch, str) and _CHANNEL.match(ch):
            good_channels.append(ch)
        else:
            s.problem("channels", f"channels: {ch!r} is not a channel name like '#ops'")
    prefix = s.get("command_prefix", str, "!", lambda v: None if v and not any(c.isspace() for c in v) else
                   "a non-blank word")
    rate = s.get("pacing_rate", (int, float), DEFAULT_RATE, lambda v: None if v > 0 else "must be more than 0")
    burst = s.get("pacing_burst", int, DEFAULT_BURST, lambda v: None if v >= 1 else "at least 1")
    # At least 10: fewer would cut ordinary answers (help, a short ps) for nothing.
    max_queued = s.get("max_queued_lines", int, DEFAULT_MAX_QUEUED,
                       lambda v: None if v >= MIN_MAX_QUEUED else f"at least {MIN_MAX_QUEUED}")
    rmin = s.duration("reconnect_min", 1.0)
    rmax = s.duration("reconnect_max", 300.0)
    if rmin > rmax:
        s.problem("reconnect_min", "reconnect_min: must not exceed reconnect_max")
    allow_hostmask = s.get("allow_hostmask", bool, True)
    use_notice = s.get("use_notice", bool, False)
    ping_interval = s.duration("ping_interval", 60.0)
    ping_timeout = s.duration("ping_timeout", 30.0)
    if len(s.findings.problems) > problems_before or name is None or host is None or nick is None:
        return None
    return IrcConfig(name=name, host=host, nick=nick, port=port, tls=tls, tls_verify=tls_verify, ca_file=ca_file,
                     username=username, realname=realname, sasl_account=account, sasl_password=password,
                     channels=tuple(good_channels), command_prefix=prefix, pacing_rate=float(rate),
                     pacing_burst=burst, max_queued_lines=max_queued, reconnect_min=rmin, reconnect_max=rmax,
                     allow_hostmask=allow_hostmask, use_notice=use_notice, ping_interval=ping_interval,
                     ping_timeout=ping_timeout)
