"""What a participant gets: its checked section of bot.yaml before any
workitem, services (clock, users, reply, the step's unrendered params), its
own storage (numbered migrations run by the store, writes through the
writer), and discovery through entry points."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping

import pytest

from bot.access import Directory, User
from bot.config import load_config
from engine.configkit import Section
from engine.engine import Engine
from engine.errors import EngineError
from engine.participant_runtime import ParticipantEnv
from engine.participants import (DiscoveryError, Participant, ParticipantRegistry, Reply, Services,
                                 UserDirectory, Workitem)
from engine.yamlconfig import ConfigError
from participants import ENTRY_POINT_GROUP, discover
from participants.builtin import Echo
from participants.command import CommandConfig
from tests.botproc import make_home
from tests.engine_fixtures import EngineFactory, close_engine

ROOT = Path(__file__).resolve().parent.parent
Build = Callable[..., Awaitable[Engine]]


@pytest.fixture
def build(engines: EngineFactory) -> Build:
    """Started engines (from the ``engines`` factory) with a ParticipantEnv."""

    async def factory(definitions: Mapping[str, str], participants: Iterable[Participant], *,
                      env: ParticipantEnv | None = None, db: str = "p.sqlite3") -> Engine:
        return await engines(definitions, registry=ParticipantRegistry([Echo(), *participants]), db_name=db,
                             participant_env=env)

    return factory


class Probe(Participant):
    """Remembers what it was given and in which order; ``block`` keeps consume running."""

    name = "probe"
    migrations = ("CREATE TABLE probe_seen (key TEXT PRIMARY KEY, note TEXT NOT NULL);",)

    def __init__(self, block: bool = False) -> None:
        self.block = block
        self.calls: list[str] = []
        self.services: Services | None = None
        self.seen_config: Any = None

    def check_config(self, section: Section) -> dict[str, Any]:
        section.check_keys(("greeting",))
        return {"greeting": section.get("greeting", str, "hello")}

    async def setup(self, services: Services) -> None:
        self.calls.append("setup")
        self.services = services

    async def consume(self, workitem: Workitem) -> Reply:
        self.calls.append("consume")
        assert self.services is not None
        self.seen_config = self.services.config
        if self.block:
            await asyncio.Event().wait()
        if workitem.params.get("pending"):
            return Reply.pending()
        storage = self.services.storage
        return Reply.done({"greeting": self.services.config["greeting"]},
                          ops=[storage.op("INSERT INTO probe_seen (key, note) VALUES (?, ?)", workitem.key, "done")])


PROBE = """
name: p
inputs: {who: str, pending: bool}
steps:
  - participant: probe
    params: {text: "{{ who }}", pending: "{{ pending | default(false) }}"}
"""


async def wait_status(engine: Engine, iid: int, wanted: str) -> None:
    for _ in range(200):
        if (await engine.summary(iid)).status == wanted:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"#{iid} is {(await engine.summary(iid)).status}, not {wanted}")


# -- configuration ---------------------------------------------------------------------

async def test_the_config_reaches_setup_before_any_workitem_even_one_dispatched_again(build: Build) -> None:
    env = ParticipantEnv(config={"probe": {"greeting": "hi"}})
    first = Probe(block=True)
    engine = await build({"p": PROBE}, [first], env=env)
    iid = await engine.launch("p", {"who": "w"})
    await asyncio.sleep(0.05)
    assert first.calls == ["setup", "consume"]
    await close_engine(engine)                          # the workitem stays dispatched

    again = Probe()
    engine = await build({"p": PROBE}, [again], env=env)
    await engine.idle()
    assert again.calls == ["setup", "consume"] and again.seen_config == {"greeting": "hi"}
    assert (await engine.describe(iid)).fields["greeting"] == "hi"


async def test_without_a_section_the_participant_gets_its_defaults(build: Build) -> None:
    probe = Probe()
    await build({"p": PROBE}, [probe])
    assert probe.services is not None and probe.services.config == {"greeting": "hello"}


def test_bot_yaml_sections_are_checked_by_their_participants(tmp_path: Path) -> None:
    home = make_home(tmp_path, {"p": PROBE}, bot_extra="""
        participants:
          probe: {greeting: 3}
          command:
            timeout: forever
            colour: blue
          nosuch: {}
    """)
    registry = ParticipantRegistry([*discover(), Probe()])
    with pytest.raises(ConfigError) as info:
        load_config(home / "conf", registry.by_name())
    assert [str(p) for p in info.value.problems] == [
        "conf/bot.yaml:8: participants probe: greeting: expected str, got 3",
        "conf/bot.yaml:10: participants command: timeout: bad duration 'forever': expected e.g. 90s, 4h, 2d, 1h30m",
        "conf/bot.yaml:11: participants command: unknown key 'colour' (expected allow, timeout, kill_grace, "
        "max_output, env, pass_env)",
        "conf/bot.yaml:12: participants: unknown participant 'nosuch' (known: "
        + ", ".join(sorted(registry.names())) + ")",
    ]
    # names alone still catch an unknown participant
    with pytest.raises(ConfigError, match="unknown participant 'nosuch'"):
        load_config(home / "conf", registry.names())


def test_checked_sections_reach_the_config_and_steps_are_checked_by_their_participant(tmp_path: Path) -> None:
    home = make_home(tmp_path, {"ok": """
        steps:
          - participant: command
            params: {argv: [createrepo_c, --update, "{{ path }}"], timeout: 10m}
    """}, bot_extra="""
        participants:
          command: {allow: [createrepo_c], timeout: 2h}
    """)
    config = load_config(home / "conf", ParticipantRegistry(discover()).by_name())
    assert config.participant_config["command"] == CommandConfig(allow=("createrepo_c",), timeout=7200.0)
    assert config.participant_config["echo"] is None       # no section: its defaults

    (home / "conf" / "processes" / "bad.yaml").write_text(textwrap.dedent("""
        steps:
          - participant: echo
          - id: wipe
            participant: command
            params: {argv: [rm, "{{ path }}"], shell: true}
    """))
    with pytest.raises(ConfigError) as info:
        load_config(home / "conf", ParticipantRegistry(discover()).by_name())
    assert [str(p) for p in info.value.problems] == [
        "conf/processes/bad.yaml:4: step wipe: argv[0]: 'rm' is not allowed (participants: command: allow: "
        "createrepo_c)",
        "conf/processes/bad.yaml:4: step wipe: unknown param 'shell' (expected argv, timeout, cwd, env, once)",
    ]


def test_check_prints_participant_problems_with_file_and_line(tmp_path: Path) -> None:
    home = make_home(tmp_path, {}, bot_extra="""
        participants:
          command: {max_output: 10}
    """)
    result = subprocess.run([sys.executable, str(ROOT / "run_bot.py"), "check", str(home / "conf")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "conf/bot.yaml:8: participants command: max_output: at least 256 (bytes)"]


# -- services ----------------------------------------------------------------------------

async def test_services_clock_users_and_reply(build: Build) -> None:
    users = Directory([
        User("alice", roles={"Project": frozenset({"release-managers"})}, emails=("alice@example.org",)),
        User("bob", roles={"Project:Devel": frozenset({"release-managers"})}),
        User("root", roles={"*": frozenset({"admins"})}),
    ])
    directory: UserDirectory = users                         # the protocol bot.access.Directory satisfies
    probe = Probe()
    engine = await build({"p": PROBE}, [probe], env=ParticipantEnv(users=directory))
    services = probe.services
    assert services is not None
    assert services.clock.now() == engine.clock.now()
    alice = services.users.user("alice")
    assert alice is not None and alice.emails == ("alice@example.org",)
    assert services.users.user("nobody") is None
    assert [u.name for u in services.users.holders("release-managers", "Project:Devel:Tools")] == ["alice", "bob"]
    assert [u.name for u in services.users.holders("release-managers", "Project")] == ["alice"]
    assert [u.name for u in services.users.holders("admins", "Project")] == ["root"]
    root = services.users.user("root")
    assert root is not None and root.has_role("release-managers", "Project")    # admins may, but do not hold it

    iid = await engine.launch("p", {"who": "w", "pending": True})
    await engine.idle()
    [item] = await engine.pending("probe")
    await services.reply(item.key, Reply.done({"answered": True}), actor="test")
    assert (await engine.describe(iid)).fields["answered"] is True


async def test_step_params_are_the_definition_as_written_in_the_version_the_instance_runs(build: Build) -> None:
    probe = Probe()
    engine = await build({"p": PROBE}, [probe])
    iid = await engine.launch("p", {"who": "w", "pending": True})
    await engine.idle()
    [item] = await engine.pending("probe")
    assert item.params == {"text": "w", "pending": True}
    assert probe.services is not None
    assert await probe.services.step_params(item) == {"text": "{{ who }}",
                                                     "pending": "{{ pending | default(false) }}"}
    await close_engine(engine)

    changed = PROBE.replace("{{ who }}", "changed {{ who }}")
    probe = Probe()
    engine = await build({"p": changed}, [probe])
    [item] = await engine.pending("probe")
    assert probe.services is not None
    assert (await probe.services.step_params(item))["text"] == "{{ who }}"       # #1 keeps its version
    new = await engine.launch("p", {"who": "w", "pending": True})
    await engine.idle()
    [newer] = [w for w in await engine.pending("probe") if w.instance_id == new]
    assert (await probe.services.step_params(newer))["text"] == "changed {{ who }}"
    assert iid != new


# -- storage -----------------------------------------------------------------------------

class Counter1(Participant):
    name = "counter"
    migrations = ("CREATE TABLE counter_hits (key TEXT PRIMARY KEY);",)

    async def consume(self, workitem: Workitem) -> Reply:
        return Reply.done()


class Counter2(Counter1):
    migrations = (*Counter1.migrations,
                  "ALTER TABLE counter_hits ADD COLUMN n INTEGER NOT NULL DEFAULT 0;\n"
                  "CREATE INDEX counter_hits_n ON counter_hits(n);")


async def test_migrations_are_numbered_and_each_runs_once(build: Build, tmp_path: Path) -> None:
    engine = await build({}, [Counter1()])
    await close_engine(engine)
    engine = await build({}, [Counter2()])
    versions = await engine.store.read(lambda c: c.execute("SELECT owner, version FROM participant_migrations "
                                                           "ORDER BY owner").fetchall())
    assert versions == [("counter", 2)]
    columns = await engine.store.read(lambda c: [r[1] for r in c.execute("PRAGMA table_info(counter_hits)")])
    assert columns == ["key", "n"]
    await close_engine(engine)
    engine = await build({}, [Counter2()])                  # nothing left to do
    await close_engine(engine)
    with pytest.raises(Exception, match="counter's tables are at version 2, newer than this bot's"):
        await build({}, [Counter1()])


async def test_storage_writes_and_reads_only_its_own_tables(build: Build) -> None:
    probe = Probe()
    await build({}, [probe])
    assert probe.services is not None
    storage = probe.services.storage
    await storage.write(storage.op("INSERT INTO probe_seen (key, note) VALUES (?, ?)", "k", "x"),
                        storage.rows("INSERT INTO probe_seen (key, note) VALUES (?, ?)", [("a", "1"), ("b", "2")]))
    assert await storage.query("SELECT key, note FROM probe_seen ORDER BY key") == [("a", "1"), ("b", "2"),
                                                                                  ("k", "x")]
    assert await storage.query_one("SELECT note FROM probe_seen WHERE key = ?", "zzz") is None
    with pytest.raises(ValueError, match="may write only its own tables"):
        storage.op("DELETE FROM instances")
    with pytest.raises(ValueError, match="may write only its own tables"):
        storage.op("UPDATE workitems SET state = 'x'")
    with pytest.raises(ValueError, match="expected INSERT, REPLACE, UPDATE or DELETE"):
        storage.op("DROP TABLE probe_seen")
    with pytest.raises(ValueError, match="query takes a SELECT"):
        await storage.query("DELETE FROM probe_seen")


class Trespasser(Participant):
    name = "trespasser"
    migrations = ("CREATE TABLE trespasser_ok (x);\nALTER TABLE history ADD COLUMN y;",)

    async def consume(self, workitem: Workitem) -> Reply:
        return Reply.done()


async def test_a_migration_touching_another_table_stops_the_start(build: Build) -> None:
    with pytest.raises(EngineError, match="migration 1 touches 'history'"):
        await build({}, [Trespasser()])


async def test_reply_ops_are_written_in_the_commit_of_the_answer(build: Build) -> None:
    probe = Probe()
    engine = await build({"p": PROBE}, [probe])
    iid = await engine.launch("p", {"who": "w"})
    await engine.idle()
    assert (await engine.summary(iid)).status == "completed"
    assert probe.services is not None
    assert await probe.services.storage.query("SELECT note FROM probe_seen") == [("done",)]


# -- discovery ---------------------------------------------------------------------------

def _dist(tmp_path: Path, entry_points: str, modules: Mapping[str, str]) -> Path:
    """A tiny installed distribution: modules and a dist-info with entry points."""
    site = tmp_path / "site"
    info = site / "rb_extra-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rb-extra\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n" + textwrap.dedent(entry_points))
    for name, text in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(text))
    return site


EXTRA = """
    from engine.participants import Participant, Reply

    class Extra(Participant):
        name = "extra"

        async def consume(self, workitem):
            return Reply.done({"extra": True})

    class Other(Participant):
        name = "other"

        async def consume(self, workitem):
            return Reply.done()
"""


@pytest.fixture
def clean_modules() -> Iterable[None]:
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("rb_extra"):
            del sys.modules[name]


def test_installed_packages_add_participants_through_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   clean_modules: None) -> None:
    site = _dist(tmp_path, "extra = rb_extra_a:Extra\nmore = rb_extra_b\n", {"rb_extra_a": EXTRA, "rb_extra_b": """
        from engine.participants import Participant, Reply

        class More(Participant):
            name = "more"
    """})
    monkeypatch.syspath_prepend(str(site))
    names = [p.name for p in discover()]
    assert {"command", "echo", "extra", "more"} <= set(names)
    assert "other" not in names          # an entry point naming a class brings that class only


def test_an_entry_point_that_does_not_load_or_repeats_a_name_is_one_clear_problem(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_modules: None) -> None:
    monkeypatch.syspath_prepend(str(_dist(tmp_path / "a", "broken = rb_extra_missing:Nope\n", {})))
    with pytest.raises(DiscoveryError, match=r"entry point broken = rb_extra_missing:Nope \(releasebot.participants\) "
                                             r"does not load: ModuleNotFoundError"):
        discover()
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(_dist(tmp_path / "b", "echo2 = rb_extra_c:Echo\n", {"rb_extra_c": """
        from engine.participants import Participant

        class Echo(Participant):
            name = "echo"
    """})))
    with pytest.raises(DiscoveryError, match="participant 'echo' is defined twice: by participants.builtin.Echo"):
        discover()


def test_check_reports_a_broken_entry_point_in_one_line(tmp_path: Path) -> None:
    site = _dist(tmp_path, "broken = rb_extra_missing:Nope\n", {})
    home = make_home(tmp_path / "home", {})
    result = subprocess.run([sys.executable, str(ROOT / "run_bot.py"), "check", str(home / "conf")],
                            capture_output=True, text=True, timeout=30, env={"PYTHONPATH": str(site), "PATH": ""})
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "entry point broken = rb_extra_missing:Nope (releasebot.participants) does not load: "
        "ModuleNotFoundError: No module named 'rb_extra_missing'"]
