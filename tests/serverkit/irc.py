"""Real IRC servers on 127.0.0.1, without pytest (the fixtures in
``tests/servers/irc.py`` and the benchmarks in ``bench/`` both use this):
ngircd (fast, plain IRC) and InspIRCd 3 + Anope 2 (NickServ, SASL, IRCv3
account-tag), on free ports in per-run temp dirs, plus clients that play
the human.  docs/architecture.md lists the servers; the configs below say
why each setting is there.

InspIRCd listens on two client ports: ``port`` uses InspIRCd's DEFAULT
connect class (no flood/rate attributes, so the bot is tested against real
fakelag and RecvQ limits), ``helper_port`` a relaxed class for the clients
that play the humans.  The pair takes ~3 s to link; ``services=False``
starts InspIRCd alone (~0.1 s).

A missing server binary raises ``ServerMissing`` (``tests.serverkit``).
TLS: ``Ngircd(tls=cert)`` also listens with TLS on ``tls_port`` (a
certificate from ``tests.serverkit.tls.ThrowawayCA``; ngircd is built with
GnuTLS).
"""
from __future__ import annotations

import asyncio
import base64
import grp
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from tests.serverkit import free_port, require_binary, stop, wait_port
from tests.serverkit.tls import ServerCert

__all__ = ["Human", "InspircdAnope", "IrcLine", "Ngircd", "NoLateSaslProxy", "RawClient", "TcpProxy", "parse_line",
           "start_inspircd_anope", "start_ngircd"]

NGIRCD_CONF = """\
[Global]
Name = irc.test.local
Info = test ircd
Listen = 127.0.0.1
Ports = {port}
MotdPhrase = "test"

[Limits]
MaxConnectionsIP = 0
MaxNickLength = 30
PingTimeout = 120
PongTimeout = 20
{penalty}

[Options]
DNS = no
Ident = no
PAM = no
SyslogFacility = local7
IncludeDir = {dir}/conf.d

[Operator]
Name = admin
Password = adminpw
"""


NGIRCD_SSL = """
[SSL]
CertFile = {cert}
KeyFile = {key}
DHFile = {dh}
Ports = {port}
"""


# -- ngircd ----------------------------------------------------------------------------

@dataclass
class Ngircd:
    """One ngircd in the foreground; ``restart()`` keeps its ports.  With
    ``tls`` it also accepts TLS connections on ``tls_port``."""

    dir: Path
    port: int
    penalties: bool = False        # False: MaxPenaltyTime = 0 (no flood throttling)
    binary: str = "ngircd"
    proc: subprocess.Popen | None = None
    host: str = "127.0.0.1"
    tls: ServerCert | None = None
    tls_port: int | None = None    # default with tls: a free port

    def start(self) -> "Ngircd":
        (self.dir / "conf.d").mkdir(parents=True, exist_ok=True)
        conf = self.dir / "ngircd.conf"
        text = NGIRCD_CONF.format(port=self.port, dir=self.dir,
                                  penalty="" if self.penalties else "MaxPenaltyTime = 0")
        if self.tls is not None:
            if self.tls_port is None:
                self.tls_port = free_port()
            text += NGIRCD_SSL.format(cert=self.tls.cert_file, key=self.tls.key_file, dh=self.tls.dh_file,
                                      port=self.tls_port)
        conf.write_text(text)
        log = open(self.dir / "ngircd.log", "ab")
        self.proc = subprocess.Popen([self.binary, "-n", "-p", "-f", str(conf)],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        try:
            wait_port(self.port, 10, self.proc)
            if self.tls_port is not None:
                wait_port(self.tls_port, 10, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def kill(self) -> None:
        """SIGKILL: the server vanishes without a goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()


def start_ngircd(directory: Path, *, penalties: bool = False, tls: ServerCert | None = None) -> Ngircd:
    """A started ngircd in ``directory`` on a free port (``ServerMissing`` without the binary)."""
    return Ngircd(Path(directory), free_port(), penalties, require_binary("ngircd"), tls=tls).start()


# -- InspIRCd 3 + Anope 2 ---------------------------------------------------------

INSPIRCD_CONF = """\
<config format="xml">
<define name="dir" value="{dir}">
<path configdir="&dir;/conf" datadir="&dir;/data" logdir="&dir;/logs" moduledir="/usr/lib/inspircd/modules">
<pid file="&dir;/run/inspircd.pid">
<server name="irc.test.local" description="test ircd" network="TestNet">
<admin name="admin" nick="admin" email="admin@irc.test.local">
<bind address="127.0.0.1" port="{port}" type="clients">
<bind address="127.0.0.1" port="{helper_port}" type="clients">
<bind address="127.0.0.1" port="{link_port}" type="servers">
# DEFAULT class on the bot's port: no threshold/commandrate/recvq/sendq/fakelag
# attributes, only enough connections per IP for a test's clients.
<connect name="default" port="{port}" allow="*" localmax="1000" globalmax="1000" useident="no" resolvehostnames="no">
<connect name="helpers" port="{helper_port}" allow="*" maxchans="50" timeout="20" pingfreq="120" hardsendq="1M" softsendq="65536" recvq="65536" threshold="1000" commandrate="100000" fakelag="no" localmax="1000" globalmax="1000" useident="no" resolvehostnames="no" limit="5000" modes="">
<class name="Shutdown" commands="DIE RESTART REHASH LOADMODULE UNLOADMODULE RELOADMODULE GLOADMODULE GUNLOADMODULE GRELOADMODULE">
<type name="NetAdmin" classes="Shutdown" vhost="netadmin.test.local">
<oper name="admin" password="adminpw" host="*@127.0.0.1" type="NetAdmin">
<dns timeout="1">
<options allowzerolimit="no" defaultmodes="{channel_modes}">
<security runasuser="" hidesplits="no">
<performance netbuffersize="10240" somaxconn="128" softlimit="1024" clonesonconnect="no" timeskipwarn="2s">
<log method="file" type="* -USERINPUT -USEROUTPUT" level="default" target="&dir;/logs/ircd.log">
<files motd="&dir;/conf/motd.txt">
<limits maxnick="30" maxchan="64" maxmodes="20" maxident="10" maxhost="64" maxquit="255" maxtopic="307" maxkick="255" maxreal="128" maxgecos="128" maxaway="200">
<module name="cap">
<module name="ircv3">
<module name="ircv3_accounttag">
<module name="ircv3_servertime">
<module name="ircv3_msgid">
<module name="ircv3_echomessage">
<module name="ircv3_ctctags">
<module name="sasl">
<module name="services_account">
<module name="hidechans">
<module name="svshold">
<module name="chghost">
<module name="chgident">
<module name="spanningtree">
<sasl target="services.test.local">
<link name="services.test.local" ipaddr="127.0.0.1" port="{link_port}" allowmask="127.0.0.0/8" sendpass="linkpw" recvpass="linkpw">
<uline server="services.test.local" silent="yes">
"""

ANOPE_SERVICES_CONF = """\
define {{ name = "services.host"; value = "services.test.local" }}
uplink {{ host = "127.0.0.1"; ipv6 = no; ssl = no; port = {link_port}; password = "linkpw" }}
serverinfo {{ name = "services.test.local"; description = "Test Services"; pid = "{dir}/anope.pid"; motd = "{dir}/conf/services.motd" }}
module {{ name = "inspircd3"; use_server_side_mlock = yes; use_server_side_topiclock = yes }}
networkinfo {{ networkname = "TestNet"; nicklen = 30; userlen = 10; hostlen = 64; chanlen = 32; modelistsize = 100; vhost_chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-"; allow_undotted_vhosts = false; disallow_start_or_end = ".-" }}
options {{ casemap = "rfc1459"; strictpasswords = no; badpasslimit = 0; badpasstimeout = 1h; updatetimeout = 5m; expiretimeout = 30m; readtimeout = 5s; warningtimeout = 4h; timeoutcheck = 3s; retrywait = 1s; hideprivilegedcommands = yes; hideregisteredcommands = yes }}
include {{ type = "file"; name = "nickserv.conf" }}
log {{ target = "services.log"; admin = "*"; override = "*"; commands = "*"; servers = "*"; users = "*"; other = "*"; rawio = "" }}
mail {{ usemail = no }}
module {{ name = "db_flatfile"; database = "anope.db"; keepbackups = 0; fork = no }}
module {{ name = "enc_sha256" }}
module {{ name = "m_sasl" }}
"""


class RawClient:
    """A blocking, minimal IRC client for fixtures (readiness, registering accounts)."""

    def __init__(self, port: int, nick: str, timeout: float = 10.0) -> None:
        self.nick = nick
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.send(f"NICK {nick}")
        self.send(f"USER {nick} 0 * :{nick}")
        self.expect(lambda line: line.split(" ")[1:2] == ["001"], timeout)

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r\n")

    def lines(self, deadline: float) -> Iterator[str]:
        while time.monotonic() < deadline:
            while b"\n" in self.buf:
                raw, self.buf = self.buf.split(b"\n", 1)
                line = raw.rstrip(b"\r").decode("utf-8", "replace")
                if line.startswith("PING "):
                    self.send("PONG " + line[5:])
                    continue
                yield line
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise ConnectionError("server closed the connection")
            self.buf += data

    def expect(self, pred, timeout: float = 10.0) -> str:  # type: ignore[no-untyped-def]
        for line in self.lines(time.monotonic() + timeout):
            if pred(line):
                return line
        raise TimeoutError(f"{self.nick}: no expected line within {timeout}s")

    def close(self) -> None:
        try:
            self.send("QUIT :done")
        except OSError:
            pass
        self.sock.close()


class Ticker(threading.Thread):
    """Keeps InspIRCd's main loop turning.  It completes a client's registration
    only in its once-a-second housekeeping, which an idle server reaches a whole
    second after the client's last line (its epoll wait), a busy one at the next
    second boundary: measured, 1.0 s per registration on an idle test server,
    0.5 s on average with a client that PINGs every 20 ms.  Real servers are busy."""

    def __init__(self, port: int) -> None:
        super().__init__(name=f"insp-ticker-{port}", daemon=True)
        self.port = port
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                sock.sendall(f"NICK tick{self.port}\r\nUSER tick 0 * :tick\r\n".encode())
                sock.setblocking(False)
                while not self.stopped.wait(0.02):
                    sock.sendall(b"PING :tick\r\n")
                    try:
                        if not sock.recv(65536):
                            return
                    except BlockingIOError:
                        pass
        except OSError:        # the server went away (a test killed it): nothing to keep turning
            return

    def stop(self) -> None:
        self.stopped.set()


@dataclass
class InspircdAnope:
    """InspIRCd with Anope linked to it.  Each can be stopped and started on
    its own (same ports, same account database): ``stop_services`` (SIGTERM,
    anope saves its accounts), ``kill_ircd`` (SIGKILL), ``start_ircd``,
    ``start_services`` (returns once NickServ answers)."""

    dir: Path
    port: int            # DEFAULT connect class: the bot connects here
    helper_port: int     # relaxed class for the tests' own clients
    link_port: int
    ircd: subprocess.Popen | None = None
    services: subprocess.Popen | None = None
    ticker: "Ticker | None" = None
    accounts: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    channel_modes: str = "nt"    # a new channel's modes; "not": its creator is an op

    @property
    def procs(self) -> list[subprocess.Popen]:
        return [p for p in (self.ircd, self.services) if p is not None]

    def start(self, services: bool = True) -> "InspircdAnope":
        """Both servers; ``services=False``: InspIRCd alone (ready in ~0.1 s)."""
        insp, anope = self.dir / "insp", self.dir / "anope"
        for sub in ("conf", "data", "logs", "run"):
            (insp / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("conf", "db", "logs"):
            (anope / sub).mkdir(parents=True, exist_ok=True)
        (insp / "conf" / "motd.txt").write_text("test\n")
        (insp / "conf" / "inspircd.conf").write_text(INSPIRCD_CONF.format(
            dir=insp, port=self.port, helper_port=self.helper_port, link_port=self.link_port,
            channel_modes=self.channel_modes))
        nickserv = Path("/etc/anope/nickserv.conf").read_text()
        nickserv = (nickserv.replace("forceemail = yes", "forceemail = no")
                    .replace("regdelay = 30s", "regdelay = 0s")
                    # no killprotect: an impostor test must not race NickServ's 60 s rename
                    .replace('defaults = "killprotect ', 'defaults = "'))
        (anope / "conf" / "nickserv.conf").write_text(nickserv)
        (anope / "conf" / "services.motd").write_text("test\n")
        (anope / "conf" / "services.conf").write_text(ANOPE_SERVICES_CONF.format(
            dir=anope, link_port=self.link_port))
        (anope / "db" / "anope.db").unlink(missing_ok=True)   # a fresh account database every run
        try:
            self.start_ircd()
            if services:
                self.start_services()
        except BaseException:
            self.stop()
            raise
        return self

    def start_ircd(self) -> None:
        insp = self.dir / "insp"
        self.ircd = self._spawn([require_binary("inspircd"), "--nofork", "--runasroot",
                                 f"--config={insp / 'conf' / 'inspircd.conf'}"], insp / "logs" / "stdout.log")
        for port in (self.link_port, self.port, self.helper_port):
            wait_port(port, 10, self.ircd)
        self.ticker = Ticker(self.helper_port)
        self.ticker.start()

    def kill_ircd(self) -> None:
        """SIGKILL: the server vanishes without a goodbye (services lose their link)."""
        if self.ircd is not None and self.ircd.poll() is None:
            self.ircd.kill()
            self.ircd.wait(5)
        self.ircd = None

    def start_services(self, timeout: float = 20) -> None:
        """Anope, with the accounts it saved when it last stopped; returns once linked."""
        anope = self.dir / "anope"
        self.services = self._spawn([require_binary("anope"), "--nofork", f"--confdir={anope / 'conf'}",
                                     f"--dbdir={anope / 'db'}", f"--logdir={anope / 'logs'}",
                                     "--modulesdir=/usr/lib/anope"], anope / "logs" / "stdout.log",
                                    **self._unprivileged(anope))
        self._wait_services(timeout)

    def _unprivileged(self, anope: Path) -> dict[str, int]:
        """Run as root, Anope warns and sleeps 3 s before it starts (measured with strace):
        as root, run it as ``nobody``, owning its own directory."""
        if os.geteuid() != 0:
            return {}
        try:
            uid, gid = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
        except KeyError:
            return {}
        self.dir.chmod(0o755)                  # mkdtemp made it 0700
        for path in [anope, *anope.rglob("*")]:
            os.chown(path, uid, gid)
        return {"user": uid, "group": gid}

    def stop_services(self) -> None:
        """SIGTERM: anope writes its account database and leaves."""
        if self.services is not None:
            stop(self.services)
        self.services = None

    @staticmethod
    def _spawn(argv: list[str], log_path: Path, **options: Any) -> subprocess.Popen:
        log = open(log_path, "ab")
        try:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    **options)
        finally:
            log.close()

    def _wait_services(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.ircd is not None
        wait_port(self.helper_port, timeout, self.ircd)
        client = RawClient(self.helper_port, "readiness")
        try:
            while time.monotonic() < deadline:
                for proc in self.procs:
                    if proc.poll() is not None:
                        raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
                client.send("WHOIS NickServ")
                line = client.expect(lambda l: l.split(" ")[1:2] in (["311"], ["401"]), 5)
                if line.split(" ")[1] == "311":
                    return
                time.sleep(0.1)
            raise TimeoutError("NickServ did not appear")
        finally:
            client.close()

    def register(self, *accounts: tuple[str, str]) -> None:
        """Register NickServ accounts ``(name, password)`` over one connection
        (idempotent within the session)."""
        todo = [(a, p) for a, p in accounts if self.accounts.get(a) != p]
        if not todo:
            return
        client = RawClient(self.helper_port, todo[0][0])
        try:
            for account, password in todo:
                if client.nick != account:
                    client.send(f"NICK {account}")
                    client.expect(lambda l: l.split(" ")[1:2] == ["NICK"], 10)
                    client.nick = account
                client.send(f"PRIVMSG NickServ :REGISTER {password} {account}@example.test")
                line = client.expect(lambda l: l.startswith(":NickServ!") and " NOTICE " in l
                                     and ("registered" in l or "denied" in l or "already" in l), 10)
                if "registered." not in line:
                    raise RuntimeError(f"cannot register {account}: {line}")
                self.accounts[account] = password
        finally:
            client.close()

    def stop(self) -> None:
        if self.ticker is not None:
            self.ticker.stop()
        for proc in reversed(self.procs):   # services first: anope writes anope.db on exit
            stop(proc)
        self.ircd = self.services = None

    def cleanup(self) -> None:
        """Stop both and remove the directory (kept with KEEP_SERVER_DIRS=1)."""
        self.stop()
        if os.environ.get("KEEP_SERVER_DIRS") != "1":
            shutil.rmtree(self.dir, ignore_errors=True)


# -- an asyncio client that plays the human --------------------------------------------------

@dataclass
class IrcLine:
    raw: str
    tags: dict[str, str]
    prefix: str
    command: str
    params: list[str]

    @property
    def nick(self) -> str:
        return self.prefix.split("!", 1)[0]

    @property
    def text(self) -> str:
        return self.params[-1] if self.params else ""


def parse_line(raw: str) -> IrcLine:
    tags: dict[str, str] = {}
    rest = raw
    if rest.startswith("@"):
        tag_text, _, rest = rest[1:].partition(" ")
        for item in tag_text.split(";"):
            key, _, value = item.partition("=")
            tags[key] = value
    prefix = ""
    if rest.startswith(":"):
        prefix, _, rest = rest[1:].partition(" ")
    head, sep, trailing = rest.partition(" :")
    params = head.split()
    command = params.pop(0).upper() if params else ""
    if sep:
        params.append(trailing)
    return IrcLine(raw, tags, prefix, command, params)


class Human:
    """A real IRC client (raw asyncio streams): optional CAPs and SASL PLAIN.
    ``expect`` waits for the next matching line after the last one matched."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    _task: asyncio.Task[None]

    def __init__(self, nick: str) -> None:
        self.nick = nick
        self.lines: list[IrcLine] = []
        self.pos = 0
        self.caps: set[str] = set()
        self.closed = asyncio.Event()
        self._changed = asyncio.Event()

    @classmethod
    async def connect(cls, port: int, nick: str, *, caps: tuple[str, ...] = (),
                      sasl: tuple[str, str] | None = None, timeout: float = 10.0) -> "Human":
        self = cls(nick)
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self._task = asyncio.get_running_loop().create_task(self._read())
        want = list(caps) + (["sasl"] if sasl else [])
        if want:
            self.send("CAP LS 302")
        self.send(f"NICK {nick}")
        self.send(f"USER {nick} 0 * :{nick}")
        if want:
            await self.expect(lambda m: m.command == "CAP" and len(m.params) > 1 and m.params[1] == "LS", timeout)
            self.send("CAP REQ :" + " ".join(want))
            ack = await self.expect(lambda m: m.command == "CAP" and m.params[1] in ("ACK", "NAK"), timeout)
            assert ack.params[1] == "ACK", ack.raw
            self.caps = set(ack.text.split())
            if sasl:
                self.send("AUTHENTICATE PLAIN")
                await self.expect(lambda m: m.command == "AUTHENTICATE", timeout)
                self.send("AUTHENTICATE " + base64.b64encode(f"\0{sasl[0]}\0{sasl[1]}".encode()).decode())
                done = await self.expect(lambda m: m.command in ("903", "904"), timeout)
                assert done.command == "903", done.raw
            self.send("CAP END")
        welcome = await self.expect(lambda m: m.command == "001", timeout)
        self.nick = welcome.params[0]
        return self

    async def _read(self) -> None:
        try:
            while True:
                raw = await self.reader.readline()
                if not raw:
                    break
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line.startswith("PING "):
                    self.send("PONG " + line[5:])
                self.lines.append(parse_line(line))
                self._changed.set()
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
            self._changed.set()

    def send(self, line: str) -> None:
        self.writer.write(line.encode() + b"\r\n")

    def say(self, target: str, text: str) -> None:
        self.send(f"PRIVMSG {target} :{text}")

    async def join(self, channel: str, timeout: float = 10.0) -> None:
        self.send(f"JOIN {channel}")
        await self.expect(lambda m: m.command == "366" and m.params[1].lower() == channel.lower(), timeout)

    async def expect(self, pred: Callable[[IrcLine], bool], timeout: float = 10.0) -> IrcLine:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            while self.pos < len(self.lines):
                line = self.lines[self.pos]
                self.pos += 1
                if pred(line):
                    return line
            if self.closed.is_set():
                raise ConnectionError(f"{self.nick}: connection closed while waiting")
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(f"{self.nick}: no matching line within {timeout}s")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def messages_from(self, nick: str, n: int, timeout: float = 10.0,
                            target: str | None = None) -> list[IrcLine]:
        """The next ``n`` PRIVMSG/NOTICE lines from ``nick`` (to ``target``, if given)."""
        out = []
        for _ in range(n):
            out.append(await self.expect(lambda m: m.command in ("PRIVMSG", "NOTICE") and m.nick == nick
                                         and (target is None or m.params[0].lower() == target.lower()), timeout))
        return out

    async def ask(self, target: str, text: str, bot: str, timeout: float = 10.0) -> IrcLine:
        """Say ``text`` and wait for the bot's next line."""
        self.say(target, text)
        [reply] = await self.messages_from(bot, 1, timeout)
        return reply

    async def quiet(self, nick: str, seconds: float) -> list[IrcLine]:
        """Lines from ``nick`` arriving within ``seconds`` (expected: none)."""
        await asyncio.sleep(seconds)
        got = [m for m in self.lines[self.pos:] if m.command in ("PRIVMSG", "NOTICE") and m.nick == nick]
        self.pos = len(self.lines)
        return got

    async def close(self) -> None:
        if not self.closed.is_set():
            try:
                self.send("QUIT :bye")
                await self.writer.drain()
            except (ConnectionError, OSError):
                pass
        self.writer.close()
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):
            pass


# -- starting a pair ------------------------------------------------------------------------

def start_inspircd_anope(prefix: str = "irc-insp-", *, services: bool = True,
                         channel_modes: str = "nt") -> InspircdAnope:
    """A started InspIRCd (+ Anope with ``services``) in a temp dir of its own,
    removed again by ``cleanup()`` (kept with KEEP_SERVER_DIRS=1)."""
    require_binary("inspircd")
    if services:
        require_binary("anope")
    base = Path(tempfile.mkdtemp(prefix=prefix))
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    port, helper_port, link_port = sorted(ports)
    pair = InspircdAnope(base, port, helper_port, link_port, channel_modes=channel_modes)
    try:
        pair.start(services=services)
    except BaseException:
        pair.cleanup()
        raise
    return pair


# -- proxies between the bot and a server ------------------------------------------------------

class TcpProxy:
    """Between the bot and ngircd: can refuse new connections (to order a
    reconnect after the human rejoined) and black-hole live ones (a network
    that silently stops delivering, in both directions)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.accepting = True
        self.links: list[dict[str, Any]] = []

    async def start(self) -> "TcpProxy":
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return
        link: dict[str, Any] = {"frozen": False, "writers": (writer, up_writer)}
        self.links.append(link)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if not link["frozen"]:
                        dst.write(data)
                        await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def freeze(self) -> None:
        for link in self.links:
            link["frozen"] = True

    async def close(self) -> None:
        self.server.close()
        for link in self.links:
            for w in link["writers"]:
                w.close()


class NoLateSaslProxy:
    """Between the bot and InspIRCd, plays a server that takes no SASL after
    registration (IRCv3 leaves that to the server): once the client was
    welcomed, its ``CAP REQ :sasl`` is answered ``NAK`` and not passed on.
    Everything else passes, both ways."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.refused = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> "NoLateSaslProxy":
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        self.writers += [writer, up_writer]
        nick: list[str] = []

        async def down() -> None:
            while raw := await up_reader.readline():
                line = parse_line(raw.decode("utf-8", "replace").rstrip("\r\n"))
                if line.command == "001":
                    nick.append(line.params[0])
                writer.write(raw)

        async def up() -> None:
            while raw := await reader.readline():
                line = parse_line(raw.decode("utf-8", "replace").rstrip("\r\n"))
                if nick and line.command == "CAP" and line.params[:1] == ["REQ"] and "sasl" in line.text.split():
                    self.refused += 1
                    writer.write(f":irc.test.local CAP {nick[0]} NAK :{line.text}\r\n".encode())
                    continue
                up_writer.write(raw)

        try:
            await asyncio.gather(down(), up())
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            up_writer.close()

    async def close(self) -> None:
        self.server.close()
        for writer in self.writers:
            writer.close()
