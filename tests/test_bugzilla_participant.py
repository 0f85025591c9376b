"""The bugzilla participant in a real engine against the fake Bugzilla (a real
HTTP server on 127.0.0.1): fixed vs mentioned, one update per bug, several
trackers, dry-run failures, missing and private bugs, an update the workflow
refuses, exactly once across a lost answer, a 5xx and a retry, the API key
never in a log, and a slow Bugzilla that does not stall the event loop."""
from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import textwrap
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest

from engine.configkit import Findings, Section
from engine.engine import Engine
from engine.errors import Refusal
from engine.participant_runtime import ParticipantEnv
from engine.participants import ParticipantRegistry
from engine.yamlconfig import loads_yaml
from participants.bugzilla import Bugzilla
from participants.bugzilla.config import BugzillaConfig
from participants.builtin import Echo
from tests.engine_fixtures import EngineFactory
from tests.fakebugzilla import FakeBugzilla
from tests.servers import free_port

BMC_KEY = "bmc-key-" + "9f8e7d6c5b4a" * 3
RHBZ_KEY = "rhbz-key-" + "0a1b2c3d4e5f" * 3
CHANGELOG = """\
* Mon Nov 20 2026 Jane Doe <jane@example.org> - 1.2-3
- Fixes BMC#1 (a crash), see BMC#2
- Fixes: BMC#3, BMC#4
- Resolves BMC#99 and BMC#6
"""


@pytest.fixture
def bmc() -> Iterator[FakeBugzilla]:
    with FakeBugzilla() as fake:
        fake.add_account("releasebot@example.org", BMC_KEY)
        yield fake


@pytest.fixture
def rhbz() -> Iterator[FakeBugzilla]:
    with FakeBugzilla() as fake:
        fake.add_account("releasebot@example.org", RHBZ_KEY)
        yield fake


def tracker(name: str, url: str, env: str, pattern: str, projects: list[str], **extra: Any) -> dict[str, Any]:
    return {name: {"url": url, "api_key_env": env, "reference": pattern, "status": "RESOLVED",
                   "resolution": "FIXED", "projects": projects, **extra}}


def configure(monkeypatch: pytest.MonkeyPatch, *trackers: Mapping[str, Any],
              keys: Mapping[str, str] | None = None) -> BugzillaConfig:
    """The participant's config, through its own check (JSON is YAML)."""
    for env, value in {"TEST_BMC_KEY": BMC_KEY, "TEST_RHBZ_KEY": RHBZ_KEY, **(keys or {})}.items():
        monkeypatch.setenv(env, value)
    node = loads_yaml(json.dumps({"trackers": {k: v for t in trackers for k, v in t.items()}}), "bot.yaml")
    findings = Findings()
    config = Bugzilla().check_config(Section(node, "bot.yaml", findings, label="participants bugzilla"))
    assert not findings.problems, findings.problems
    assert isinstance(config, BugzillaConfig)
    return config


def bmc_tracker(fake: FakeBugzilla, **extra: Any) -> dict[str, Any]:
    return tracker("bmc", fake.url, "TEST_BMC_KEY", r"BMC#(?P<key>\d+)", ["Project"], products=["Product"],
                   **extra)


def definition(**params: Any) -> str:
    step = {"id": "update", "participant": "bugzilla",
            "params": {"changelog": "{{ changelog }}", "package": "{{ package }}", "version": "{{ version }}",
                       **params}}
    return json.dumps({"name": "bugs", "project": "Project", "fields": {"package": "foo", "version": "1.2-3"},
                       "inputs": {"changelog": "str", "package": "str", "version": "str", "dry_run": "bool"},
                       "steps": [step]})


class Harness:
    def __init__(self, engine: Engine, participant: Bugzilla) -> None:
        self.engine = engine
        self.participant = participant

    async def run(self, changelog: str | None = None, **fields: Any) -> tuple[str, dict[str, Any], str, int]:
        values = dict(fields)
        if changelog is not None:
            values["changelog"] = changelog
        iid = await self.engine.launch("bugs", values)
        return await self.finish(iid)

    async def finish(self, iid: int) -> tuple[str, dict[str, Any], str, int]:
        await self.engine.idle(timeout=20)
        summary = await self.engine.summary(iid)
        return summary.status, dict((await self.engine.describe(iid)).fields), summary.error, iid

    def intents(self) -> list[tuple[Any, ...]]:
        path = self.engine.store.path if hasattr(self.engine.store, "path") else None
        assert path is not None
        with sqlite3.connect(path) as db:
            return list(db.execute("SELECT tracker, bug, state FROM bugzilla_intents ORDER BY tracker, bug"))


async def harness(engines: EngineFactory, config: BugzillaConfig, text: str | None = None) -> Harness:
    participant = Bugzilla()
    engine = await engines({"bugs": text or definition()}, registry=ParticipantRegistry([Echo(), participant]),
                           participant_env=ParticipantEnv(config={"bugzilla": config}))
    return Harness(engine, participant)


def rows(fields: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    return {row["ref"]: (row["action"], row["message"]) for row in fields["bugzilla"]}


def bot_comments(fake: FakeBugzilla, bug: int) -> list[str]:
    return [c.text for c in fake.bug(bug).comments[1:] if c.creator == "releasebot@example.org"]


# -- what happens to which bug -------------------------------------------------------------

async def test_a_fixed_bug_moves_with_its_comment_in_one_update_and_a_mentioned_bug_gets_a_comment(
        engines: EngineFactory, bmc: FakeBugzilla, monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(2):
        bmc.add_bug("Product", "crash", status="CONFIRMED")          # 1 fixed, 2 mentioned
    bmc.add_bug("Product", "old", status="RESOLVED", resolution="FIXED")     # 3 already there
    bmc.add_bug("Other", "elsewhere")                                 # 4 another product
    bmc.add_bug("Product", "hidden", groups=["security"], bug_id=6)  # 6 private; 99 does not exist
    h = await harness(engines, configure(monkeypatch, bmc_tracker(bmc)))
    status, fields, error, iid = await h.run(CHANGELOG)
    assert (status, error) == ("completed", "")
    assert rows(fields) == {
        "BMC#1": ("fixed", "CONFIRMED -> RESOLVED FIXED"),
        "BMC#2": ("commented", "commented (mentioned)"),
        "BMC#3": ("skipped", "already RESOLVED FIXED"),
        "BMC#4": ("skipped", "product 'Other' is not one of the tracker's (Product)"),
        "BMC#99": ("skipped", "does not exist"),
        "BMC#6": ("skipped", "is private: the bot's account may not see it"),
    }
    assert fields["bugzilla_summary"].startswith("1 fixed, 1 commented, 4 skipped; BMC#3: already RESOLVED FIXED;")
    assert (bmc.bug(1).status, bmc.bug(1).resolution, bmc.bug(2).status) == ("RESOLVED", "FIXED", "CONFIRMED")
    [fixed] = bot_comments(bmc, 1)
    [mentioned] = bot_comments(bmc, 2)
    marker = fixed.splitlines()[-1]
    assert fixed.startswith("Fixed in foo 1.2-3:\n  - Fixes BMC#1 (a crash), see BMC#2\n(bugs #1 for Project)")
    assert mentioned.startswith("Mentioned in foo 1.2-3:\n  - Fixes BMC#1 (a crash), see BMC#2\n")
    assert marker.startswith("[releasebot ") and marker.endswith(f" #{iid} 0]") and mentioned.endswith(marker)
    assert [bot_comments(bmc, n) for n in (3, 4, 6)] == [[], [], []]
    # one batched read, each unseen bug read alone (missing or private?), one update per bug that changes
    assert bmc.requests == [("GET", "/rest/version"), ("GET", "/rest/bug"), ("GET", "/rest/bug/99"),
                            ("GET", "/rest/bug/6"), ("PUT", "/rest/bug/1"), ("PUT", "/rest/bug/2")]
    assert bmc.connections == 1
    assert h.intents() == []                   # gone with the answer


async def test_mentioned_nothing_and_several_packages_make_one_update_per_bug(
        engines: EngineFactory, bmc: FakeBugzilla, monkeypatch: pytest.MonkeyPatch) -> None:
    one, two = bmc.add_bug(), bmc.add_bug()
    config = configure(monkeypatch, bmc_tracker(bmc, mentioned="nothing",
                                                comment="{% for p in packages %}{{ p.name }}={{ p.version }} "
                                                        "{% endfor %}approved by {{ approved_by }}"))
    text = definition(changelog=[{"package": "alpha", "version": "1", "changelog": "- Related BMC#1\n- see BMC#2"},
                                 {"package": "beta", "version": "2", "changelog": "- Fixes BMC#1"}],
                      approved_by="alice")
    h = await harness(engines, config, text.replace('"package": "{{ package }}", "version": "{{ version }}", ', ""))
    status, fields, error, _ = await h.run()
    assert (status, error) == ("completed", "")
    assert rows(fields) == {"BMC#1": ("fixed", "CONFIRMED -> RESOLVED FIXED"),
                            "BMC#2": ("skipped", "only mentioned (mentioned: nothing)")}
    [comment] = bot_comments(bmc, one)
    assert comment.splitlines()[0] == "alpha=1 beta=2 approved by alice"
    assert bot_comments(bmc, two) == [] and bmc.count("PUT") == 1


async def test_each_tracker_serves_its_projects(engines: EngineFactory, bmc: FakeBugzilla, rhbz: FakeBugzilla,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    bmc.add_bug()
    rhbz.add_bug("Product", bug_id=123456)
    config = configure(monkeypatch, bmc_tracker(bmc),
                       tracker("rhbz", rhbz.url, "TEST_RHBZ_KEY", r"rhbz#(?P<key>\d+)", ["Project:Tools"],
                               triggers=["Resolves"]))
    h = await harness(engines, config)
    changelog = "- Fixes BMC#1\n- Resolves: rhbz#123456"
    status, fields, _, _ = await h.run(changelog, project="Project:Devel")
    assert status == "completed" and list(rows(fields)) == ["BMC#1"]
    assert rhbz.requests == []                               # not this project's tracker: never asked
    status, fields, _, _ = await h.run(changelog, project="Project:Tools")
    assert status == "completed"
    assert rows(fields) == {"BMC#1": ("skipped", "already RESOLVED FIXED"),
                            "rhbz#123456": ("fixed", "CONFIRMED -> RESOLVED FIXED")}
    assert len(bot_comments(rhbz, 123456)) == 1 and len(bot_comments(bmc, 1)) == 1


async def test_no_tracker_for_the_project_changes_nothing(engines: EngineFactory, bmc: FakeBugzilla,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    config = configure(monkeypatch, tracker("bmc", bmc.url, "TEST_BMC_KEY", r"BMC#(?P<key>\d+)", ["Elsewhere"]))
    h = await harness(engines, config)
    status, fields, _, _ = await h.run("- Fixes BMC#1")
    assert status == "completed" and fields["bugzilla_summary"] == "no tracker is used by project Project"
    assert bmc.requests == []


# -- dry run ---------------------------------------------------------------------------------

async def test_a_dry_run_fails_listing_every_reason_and_changes_nothing(
        engines: EngineFactory, bmc: FakeBugzilla, monkeypatch: pytest.MonkeyPatch) -> None:
    bmc.add_bug(status="CONFIRMED")                                    # 1: CONFIRMED -> VERIFIED not allowed
    bmc.add_bug(status="RESOLVED", resolution="FIXED")                 # 2: closed
    bmc.add_bug(status="IN_PROGRESS")                                  # 3: mentioned only
    config = configure(monkeypatch, bmc_tracker(bmc, status="VERIFIED"))
    h = await harness(engines, config, definition(dry_run="{{ dry_run }}"))
    status, _, error, _ = await h.run("- Fixes BMC#1, BMC#2, BMC#77\n- Related BMC#3", dry_run="true")
    assert status == "failed"
    assert error == ("update: dry run: 3 fixed bug(s) cannot be updated: BMC#1 cannot move from CONFIRMED to "
                     "VERIFIED under the tracker's workflow; BMC#2 is already closed (RESOLVED FIXED); "
                     "BMC#77 does not exist")
    assert bmc.count("PUT") == 0 and all(bot_comments(bmc, n) == [] for n in (1, 2, 3))
    assert h.intents() == []


async def test_a_clean_dry_run_reports_what_would_happen(engines: EngineFactory, bmc: FakeBugzilla,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    bmc.add_bug(status="UNCONFIRMED")
    bmc.add_bug(status="VERIFIED", resolution="FIXED")
    h = await harness(engines, configure(monkeypatch, bmc_tracker(bmc)), definition(dry_run=True))
    status, fields, _, _ = await h.run("- Closes BMC#1\n- Follow-up to BMC#2")
    assert status == "completed"
    assert rows(fields) == {"BMC#1": ("would fix", "UNCONFIRMED -> RESOLVED FIXED"),
                            "BMC#2": ("would comment", "mentioned; VERIFIED FIXED")}
    assert fields["bugzilla_summary"] == "dry run: 1 would fix, 1 would comment"
    assert bmc.count("PUT") == 0 and bmc.bug(1).status == "UNCONFIRMED"


# -- refusals ----------------------------------------------------------------------------------

async def test_an_update_the_workflow_refuses_is_a_message_and_stores_nothing(
        engines: EngineFactory, bmc: FakeBugzilla, monkeypatch: pytest.MonkeyPatch) -> None:
    bmc.add_bug(status="CONFIRMED")
    bmc.add_bug(status="RESOLVED", resolution="FIXED")
    # the tracker's configured workflow is wrong about the server's: the server decides
    lax = {"CONFIRMED": ["VERIFIED"], "RESOLVED": ["VERIFIED"], "VERIFIED": ["CONFIRMED"]}
    config = configure(monkeypatch, bmc_tracker(bmc, status="VERIFIED", workflow=lax))
    h = await harness(engines, config)
    status, fields, _, iid = await h.run("- Fixes BMC#1, BMC#2")
    assert status == "completed"
    assert rows(fields) == {
        "BMC#1": ("refused", "the workflow refuses the change (123: You are not allowed to change the bug status "
                             "from CONFIRMED to VERIFIED.)"),
        "BMC#2": ("fixed", "RESOLVED -> VERIFIED FIXED")}
    assert bot_comments(bmc, 1) == [] and bmc.bug(1).status == "CONFIRMED"    # atomic: no comment either
    assert len(bot_comments(bmc, 2)) == 1
    done = [e.detail for e in await h.engine.history(iid) if e.event == "done"]
    assert any("123: You are not allowed" in d for d in done), done
    assert h.intents() == []


async def test_a_long_comment_is_cut_and_says_so(engines: EngineFactory, bmc: FakeBugzilla,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    bmc.add_bug()
    h = await harness(engines, configure(monkeypatch, bmc_tracker(bmc)))
    status, fields, _, _ = await h.run("- Fixes BMC#1 " + "word " * 14000)
    assert status == "completed"
    assert rows(fields)["BMC#1"] == ("fixed", "CONFIRMED -> RESOLVED FIXED; comment cut to 65535 characters")
    [comment] = bot_comments(bmc, 1)
    assert len(comment) == 65535
    assert comment.splitlines()[-3:-1] == ["[comment cut to 65535 characters]", ""]
    assert comment.splitlines()[-1].startswith("[releasebot ")


# -- exactly once --------------------------------------------------------------------------------

async def test_a_lost_answer_a_5xx_and_retries_never_comment_twice(
        engines: EngineFactory, bmc: FakeBugzilla, monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(3):
        bmc.add_bug()

    def drop_the_answer(bug: int) -> None:       # applied, then the connection drops
        if bug == 2:
            bmc.after_update = None
            raise ConnectionAbortedError("answer lost")

    bmc.after_update = drop_the_answer
    h = await harness(engines, configure(monkeypatch, bmc_tracker(bmc)))
    status, _, error, iid = await h.run("- Fixes BMC#1\n- see BMC#2\n- Fixes BMC#3")
    assert status == "failed"
    assert error.startswith(f"update: tracker bmc: update bug 2: connection to 127.0.0.1:{bmc.port} failed; so far:")
    assert [len(bot_comments(bmc, n)) for n in (1, 2, 3)] == [1, 1, 0]
    assert h.intents() == [("bmc", 1, "done"), ("bmc", 2, "sent")]         # 3 was never sent

    bmc.fail_next(1, 503)
    await h.engine.retry(iid)
    status, _, error, _ = await h.finish(iid)
    assert status == "failed"
    assert error == f"update: tracker bmc: read bugs: 127.0.0.1:{bmc.port} answered HTTP 503 Service Unavailable"

    bmc.reset_counts()
    await h.engine.retry(iid)
    status, fields, _, _ = await h.finish(iid)
    assert status == "completed"
    assert rows(fields) == {
        "BMC#1": ("skipped", "updated already by this step"),
        "BMC#2": ("skipped", "updated already by this step (its comment carries the step's marker)"),
        "BMC#3": ("fixed", "CONFIRMED -> RESOLVED FIXED")}
    assert bmc.bug(2).status == "CONFIRMED"          # mentioned: its comment is all it gets
    assert [len(bot_comments(bmc, n)) for n in (1, 2, 3)] == [1, 1, 1]
    # bug 1 is not even read; only bug 2, whose intent was unconfirmed, has its comments read
    assert bmc.requests == [("GET", "/rest/bug"), ("GET", "/rest/bug/2/comment"), ("PUT", "/rest/bug/3")]
    assert h.intents() == []


# -- the API key, the worker thread, the chat command ---------------------------------------------

async def test_the_api_key_never_reaches_a_log_or_a_message(engines: EngineFactory, bmc: FakeBugzilla,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bmc.add_bug()
    bad_key = "wrong-" + BMC_KEY[::-1]
    nowhere = f"http://127.0.0.1:{free_port()}/rest/"
    config = configure(
        monkeypatch, bmc_tracker(bmc),
        tracker("badkey", bmc.url, "TEST_BAD_KEY", r"BAD#(?P<key>\d+)", ["*"]),
        tracker("down", nowhere, "TEST_DOWN_KEY", r"DOWN#(?P<key>\d+)", ["*"]),
        keys={"TEST_BAD_KEY": bad_key, "TEST_DOWN_KEY": RHBZ_KEY})
    h = await harness(engines, config, definition(trackers="{{ trackers }}").replace(
        '"dry_run": "bool"', '"dry_run": "bool", "trackers": "str"'))
    status, fields, _, ok = await h.run("- Fixes BMC#1", trackers="bmc")
    assert status == "completed" and rows(fields)["BMC#1"][0] == "fixed"
    status, _, bad_error, bad = await h.run("- Fixes BAD#1", trackers="badkey")
    assert status == "failed"
    assert bad_error == (f"update: tracker badkey: read bug 1: the API key in TEST_BAD_KEY is not valid for "
                         f"{bmc.url} (Bugzilla 306: The API key you specified is invalid. Please check that you "
                         f"typed it correctly.)")
    status, _, down_error, down = await h.run("- Fixes DOWN#1", trackers="down")
    assert status == "failed" and down_error == f"update: tracker down: read bug 1: cannot connect to {nowhere[7:-6]}"

    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    history = [e.detail for iid in (ok, bad, down) for e in await h.engine.history(iid)]
    for secret in (BMC_KEY, bad_key, RHBZ_KEY):
        assert secret not in logged
        assert not any(secret in d for d in history)
    # the test can fail: urllib3 did log the URLs, with the key taken out
    urls = [r.getMessage() for r in caplog.records if r.name.startswith("urllib3") and "/rest/bug" in r.getMessage()]
    assert urls and all("Bugzilla_api_key=[redacted]" in u for u in urls), urls


async def test_a_slow_bugzilla_does_not_stall_the_event_loop(engines: EngineFactory, bmc: FakeBugzilla,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    bmc.add_bug()
    bmc.delay = 0.25
    h = await harness(engines, configure(monkeypatch, bmc_tracker(bmc)))
    gaps: list[float] = []
    loop = asyncio.get_running_loop()

    async def tick() -> None:
        last = loop.time()
        while True:
            await asyncio.sleep(0.01)
            now = loop.time()
            gaps.append(now - last)
            last = now

    ticker = asyncio.ensure_future(tick())
    try:
        status, _, _, _ = await h.run("- Fixes BMC#1")       # three requests: ~0.75 s
    finally:
        ticker.cancel()
    assert status == "completed" and bmc.count() == 3
    assert len(gaps) > 30 and max(gaps) < 0.15, max(gaps)


async def test_bug_summary_for_the_chat_command(engines: EngineFactory, bmc: FakeBugzilla,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    bmc.add_bug("Product", "Crash\non start", status="RESOLVED", resolution="FIXED")
    bmc.add_bug("Product", "secret", groups=["security"])
    h = await harness(engines, configure(monkeypatch, bmc_tracker(bmc)))
    bz = h.participant
    assert bz.trackers_for("bmc") == ("Project",)
    assert await bz.bug_summary("bmc", 1) == "bmc bug 1: RESOLVED FIXED - Crash on start [Product]"
    for bug, message in ((2, "bmc bug 2 is private (the bot's account may not see it)"),
                         (3, "bmc bug 3 does not exist")):
        with pytest.raises(Refusal) as refused:
            await bz.bug_summary("bmc", bug)
        assert str(refused.value) == message
    with pytest.raises(Refusal) as refused:
        bz.trackers_for("nope")
    assert str(refused.value) == "unknown tracker 'nope' (known: bmc)"
    assert bmc.count("PUT") == 0


async def test_a_changelog_file_is_read_from_its_directory_only(engines: EngineFactory, bmc: FakeBugzilla,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    bmc.add_bug()
    (tmp_path / "changes").mkdir()
    (tmp_path / "changes" / "foo.changes").write_text(textwrap.dedent("""\
        -------------------------------------------------------------------
        Mon Nov 20 12:00:00 UTC 2026 - jane@example.org

        - Fixes BMC#1
    """))
    text = json.dumps({"name": "bugs", "project": "Project", "inputs": {"name": "str"}, "steps": [
        {"id": "update", "participant": "bugzilla",
         "params": {"changelog_file": str(tmp_path / "changes") + "/{{ name }}.changes"}}]})
    h = await harness(engines, configure(monkeypatch, bmc_tracker(bmc)), text)
    status, _, error, _ = await h.run(name="../../etc/passwd")
    assert status == "failed" and "may not contain '..'" in error
    status, fields, _, _ = await h.run(name="foo")
    assert status == "completed" and rows(fields) == {"BMC#1": ("fixed", "CONFIRMED -> RESOLVED FIXED")}
    assert bot_comments(bmc, 1)[0].startswith("Fixed in foo :\n  - Fixes BMC#1")
