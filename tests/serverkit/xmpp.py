"""A real Prosody on 127.0.0.1 for XMPP tests and benchmarks, and a real
slixmpp client that plays the human.  No pytest here (``tests/servers/xmpp``
has the fixtures); a missing binary raises ``ServerMissing``.

Each server gets a free port and its own temp dir; users are written into its
data dir before the server starts, as ``prosodyctl register`` would write them
(a Lua process per user took 40 ms, most of a test's server start).
The config is a plain loopback Prosody (no TLS, MUC rooms unlocked), plus ``smacks``
(XEP-0198 stream management, bundled with 0.12) and ``offline`` storage;
``Prosody(smacks=False)`` is a server without stream management.

``Prosody(tls=True)`` is the TLS variant: mod_tls on, STARTTLS required
(``c2s_require_encryption``), no plain authentication without it, and a
certificate for ``localhost``/127.0.0.1 signed by a throwaway CA
(``ca_file``) that no system trusts.
"""
from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tests.serverkit import free_port, require_binary, stop, wait_port
from tests.serverkit.tls import ThrowawayCA

DOMAIN = "localhost"
MUC = "conference.localhost"
USERS = {"bot": "botpw", "alice": "alicepw", "bob": "bobpw", "mallory": "mallorypw"}

CONFIG = """\
data_path = "{root}/data"
certificates = "{root}/certs"
log = {{ {{ levels = {{ min = "info" }}, to = "file", filename = "{root}/prosody.log" }} }}
interfaces = {{ "127.0.0.1" }}
local_interfaces = {{ "127.0.0.1" }}
c2s_interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {port} }}
s2s_ports = {{ }}
component_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
c2s_direct_tls_ports = {{ }}
modules_enabled = {{ "disco"; "roster"; "saslauth"; "presence"; "message"; "iq"; "ping"; "register";
                    {smacks}"offline"; {tls_module}}}
modules_disabled = {{ "s2s"; {no_tls}"posix"; }}
{tls}authentication = "internal_plain"
storage = "internal"
allow_registration = true
min_seconds_between_registrations = 0

VirtualHost "{domain}"

Component "{muc}" "muc"
  restrict_room_creation = false
  muc_room_locking = false
  muc_room_default_public = true
"""


PLAIN = """\
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
"""

TLS = """\
ssl = {{ certificate = "{cert}"; key = "{key}"; }}
c2s_require_encryption = true
allow_unencrypted_plain_auth = false
"""


class Prosody:
    """One prosody process; ``kill``/``start`` simulate a crash and restart.

    ``tls=True``: STARTTLS required, with a certificate for ``localhost`` and
    127.0.0.1 signed by ``ca`` (default: a new throwaway CA in this server's
    dir); clients must trust ``ca_file``.  ``smacks=False``: no XEP-0198."""

    def __init__(self, users: dict[str, str] | None = None, *, tls: bool = False,
                 ca: ThrowawayCA | None = None, smacks: bool = True) -> None:
        self.binary = require_binary("prosody")
        # Not pytest's tmp_path: that is 0700, and the files belong to the prosody user.
        self.root = Path(tempfile.mkdtemp(prefix="xmpp-test-"))
        self.root.chmod(0o755)
        self.port = free_port()
        self.domain, self.muc = DOMAIN, MUC
        self.users = dict(USERS if users is None else users)
        self.config = self.root / "prosody.cfg.lua"
        self.tls = tls
        self.smacks = smacks
        self.ca_file: Path | None = None
        (self.root / "data").mkdir()
        (self.root / "certs").mkdir()
        settings = PLAIN
        if tls:
            if ca is None:
                ca = ThrowawayCA.create(self.root / "ca")
            cert = ca.issue(self.root / "certs", dns=(DOMAIN,), ips=("127.0.0.1",))
            self.ca_file = cert.ca_file
            settings = TLS.format(cert=cert.cert_file, key=cert.key_file)
        self.config.write_text(CONFIG.format(root=self.root, port=self.port, domain=DOMAIN, muc=MUC,
                                             tls_module='"tls"; ' if tls else "",
                                             smacks='"smacks"; ' if smacks else "",
                                             no_tls="" if tls else '"tls"; ', tls=settings))
        shutil.chown(self.root, "prosody", "prosody")
        for user, password in self.users.items():
            self._register(user, password)
        # should prosody drop to its own user, it must still read its data and the key
        for path in [self.root / "data", self.root / "certs", *(self.root / "certs").iterdir(),
                     *(self.root / "data").rglob("*")]:
            shutil.chown(path, "prosody", "prosody")
        self.proc: subprocess.Popen[bytes] | None = None

    def _register(self, user: str, password: str) -> None:
        """The account file ``prosodyctl register`` writes for ``internal_plain``
        (names and passwords kept to characters that need no escaping in it)."""
        if not re.fullmatch(r"[a-z0-9]+", user) or not re.fullmatch(r"[A-Za-z0-9_.-]+", password):
            raise ValueError(f"test account {user!r}: use plain letters and digits")
        accounts = self.root / "data" / DOMAIN / "accounts"
        accounts.mkdir(parents=True, exist_ok=True)
        (accounts / f"{user}.dat").write_text(f'return {{\n\t["password"] = "{password}";\n}};\n')

    def jid(self, user: str) -> str:
        return f"{user}@{self.domain}"

    def room(self, name: str) -> str:
        return f"{name}@{self.muc}"

    def start(self) -> "Prosody":
        self.proc = subprocess.Popen([self.binary, "-F", "--config", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        return self

    def kill(self) -> None:
        """SIGKILL, like a crash: no stream is closed cleanly."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def leftover_pids(self) -> list[int]:
        """Any process still running with this server's config (there must be none)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cmd = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if str(self.config).encode() in cmd:
                    found.append(int(entry.name))
        return found


@dataclass
class Received:
    sender: str        # full JID: user@host/res or room@muc/nick
    type: str
    body: str
    delayed: bool


@dataclass
class Human:
    """A real slixmpp client in the test, typing at the bot."""

    server: Prosody
    user: str
    received: list[Received] = field(default_factory=list)   # without our own room echoes
    client: Any = None
    nicks: dict[str, str] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def connect(self, timeout: float = 10.0) -> "Human":
        import slixmpp

        tls = self.server.tls
        c = slixmpp.ClientXMPP(f"{self.server.jid(self.user)}/test", self.server.users[self.user],
                               plugin_config={"feature_mechanisms": {"unencrypted_scram": not tls,
                                                                     "unencrypted_plain": not tls}})
        c.enable_direct_tls = False
        c.enable_starttls = tls          # with the server's throwaway CA, hostname checked
        c.enable_plaintext = not tls
        if tls:
            c.ca_certs = self.server.ca_file
        c.register_plugin("xep_0030")
        c.register_plugin("xep_0045")
        c.register_plugin("xep_0199")
        started = asyncio.get_running_loop().create_future()
        def on_start(_: Any) -> None:
            if not started.done():
                started.set_result(True)
        c.add_event_handler("session_start", on_start)
        c.add_event_handler("message", self._on_message)
        self.client = c
        c.connect("127.0.0.1", self.server.port)
        await asyncio.wait_for(started, timeout)
        c.send_presence()
        return self

    def _on_message(self, msg) -> None:  # type: ignore[no-untyped-def]
        if msg["type"] == "groupchat" and self.nicks.get(msg["from"].bare) == msg["from"].resource:
            return
        if msg["type"] in ("chat", "normal", "groupchat") and msg["body"]:
            delayed = msg.get_plugin("delay", check=True) is not None
            self.received.append(Received(str(msg["from"]), msg["type"], msg["body"], delayed))
            self._changed.set()

    async def join(self, room: str, nick: str | None = None, history: int = 0) -> None:
        self.nicks[room] = nick or self.user
        await self.client.plugin["xep_0045"].join_muc_wait(room, nick or self.user, maxstanzas=history,
                                                           timeout=5)

    async def leave(self, room: str) -> None:
        nick = self.nicks.pop(room)
        left = asyncio.get_running_loop().create_future()

        def gone(pres: Any) -> None:
            if (pres["from"].bare, pres["from"].resource, pres["type"]) == (room, nick, "unavailable") \
                    and not left.done():
                left.set_result(True)
        self.client.add_event_handler("groupchat_presence", gone)
        try:
            self.client.plugin["xep_0045"].leave_muc(room, nick)
            await asyncio.wait_for(left, 5)
        finally:
            self.client.del_event_handler("groupchat_presence", gone)

    async def configure_room(self, room: str, **fields: str) -> None:
        """As the room's owner, submit the MUC owner form with these
        ``muc#roomconfig_<name>`` fields (e.g. ``whois="anyone"``); returns once
        the room accepted it, so the room has already told its occupants."""
        form = self.client.plugin["xep_0004"].make_form(ftype="submit")
        form.add_field(var="FORM_TYPE", ftype="hidden", value="http://jabber.org/protocol/muc#roomconfig")
        for name, value in fields.items():
            form.add_field(var=f"muc#roomconfig_{name}", value=value)
        await self.client.plugin["xep_0045"].set_room_config(room, form, timeout=5)

    async def kick(self, room: str, nick: str) -> None:
        """As a moderator, kick ``nick`` out of ``room`` (role none, status 307)."""
        await self.client.plugin["xep_0045"].set_role(room, nick, "none", timeout=5)

    def dm(self, to: str, text: str) -> None:
        self.client.send_message(mto=to, mbody=text, mtype="chat")

    def say(self, room: str, text: str) -> None:
        self.client.send_message(mto=room, mbody=text, mtype="groupchat")

    async def expect(self, match: Callable[[Received], bool], timeout: float = 5.0) -> Received:
        """The first message (old or new) that matches; it is consumed."""
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.received):
                if match(m):
                    return self.received.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.user}: no matching message in {timeout}s; got {self.received}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def ask(self, to: str, text: str, timeout: float = 5.0) -> str:
        """A direct command and the bot's reply."""
        self.dm(to, text)
        reply = await self.expect(lambda m: m.sender.split("/")[0] == to and m.type == "chat", timeout)
        return reply.body

    async def quiet(self, seconds: float) -> list[Received]:
        """Everything that arrives within ``seconds`` (consumed)."""
        await asyncio.sleep(seconds)
        got, self.received = self.received, []
        return got

    async def close(self) -> None:
        c = self.client
        if c is not None and c.transport is not None:
            try:
                await asyncio.wait_for(c.disconnect(wait=0.5), 2)
            except Exception:
                c.abort()


class CuttableProxy:
    """A TCP proxy to prosody whose connections can be cut (a network loss)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.up = True
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        self.up = False
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        self.server.close()
        await self.server.wait_closed()
