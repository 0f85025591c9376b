"""What a launch (or a retry) may carry: values are text unless the
definition declares a type in ``inputs``; a field the definition does not
know is refused with a did-you-mean; ``launch --once TOKEN`` launches at
most once per token."""
from __future__ import annotations

from typing import Any

import pytest

from bot.access import Directory, User
from bot.chat import VERIFIED_CONSOLE, Identity, Message
from bot.commands import Dispatcher, default_registry
from engine.engine import Engine
from tests.engine_fixtures import EngineFactory, Recorder, fields, status

ADMIN = Identity("console", "console", "admin", account="admin", verified_by=VERIFIED_CONSOLE)

PUBLISH = """
    name: publish-repo
    project: Project:Devel
    launch_roles: [release-managers]
    fields: {repo: devel}
    steps:
      - participant: echo
        params: {text: "publishing {{ repo }}"}
    """
TYPED = """
    name: typed
    inputs:
      version: str
      count: int
      ratio: float
      dry_run: bool
      level: [low, high]
    fields: {version: "1.0", count: 1, ratio: 0.5, dry_run: false, level: low}
    steps:
      - participant: echo
        params: {text: "{{ version }} x{{ count }}"}
    """
UNTYPED = """
    name: untyped
    fields: {who: world, version: "", key: "", n: "", t: "", empty: x}
    steps:
      - participant: echo
        params: {text: "hello {{ who }}"}
    """


async def dispatcher(engines: EngineFactory, **definitions: str) -> tuple[Dispatcher, Engine]:
    engine = await engines(dict(definitions))
    users = [User("admin", roles={"*": frozenset({"admins"})})]
    return Dispatcher(engine, Directory(users), default_registry()), engine


async def say(d: Dispatcher, text: str) -> list[str]:
    return (await d.handle(Message(ADMIN, text, None))).lines


async def launched(d: Dispatcher, engine: Engine, text: str) -> dict[str, Any]:
    [line] = await say(d, text)
    assert line.startswith("launched "), line
    await engine.idle()
    return await fields(engine, int(line.rsplit("#", 1)[1]))


# -- 1. no YAML 1.1 in launch values --------------------------------------------------------

async def test_launch_values_are_text_not_yaml_1_1(engines: EngineFactory) -> None:
    d, engine = await dispatcher(engines, untyped=UNTYPED)
    got = await launched(d, engine, "launch untyped who=no version=1.10 key=0xDEADBEEF n=010 t=12:30 empty=")
    assert {k: got[k] for k in ("who", "version", "key", "n", "t", "empty")} == {
        "who": "no", "version": "1.10", "key": "0xDEADBEEF", "n": "010", "t": "12:30", "empty": ""}


async def test_declared_inputs_convert_by_their_type(engines: EngineFactory) -> None:
    d, engine = await dispatcher(engines, typed=TYPED)
    got = await launched(d, engine, "launch typed version=1.10 count=010 ratio=1e-3 dry_run=Yes level=high")
    assert {k: got[k] for k in ("version", "count", "ratio", "dry_run", "level")} == {
        "version": "1.10", "count": 10, "ratio": 0.001, "dry_run": True, "level": "high"}
    assert type(got["count"]) is int
    for word, value in [("true", True), ("FALSE", False), ("on", True), ("Off", False), ("1", True), ("0", False),
                        ("no", False)]:
        assert (await launched(d, engine, f"launch typed dry_run={word}"))["dry_run"] is value, word


@pytest.mark.parametrize("pair, problem", [
    ("count=abc", "count: expected a whole number, got 'abc'"),
    ("count=0x10", "count: expected a whole number, got '0x10'"),
    ("count=1.5", "count: expected a whole number, got '1.5'"),
    ("count=" + "9" * 5000, "count: '" + "9" * 20 + "... is too large a number"),
    ("count=9223372036854775808", "count: '9223372036854775808' is too large a number"),
    ("ratio=fast", "ratio: expected a number, got 'fast'"),
    ("ratio=nan", "ratio: expected a number, got 'nan'"),
    ("dry_run=maybe", "dry_run: expected true or false (yes/no, on/off, 1/0), got 'maybe'"),
    ("level=medium", "level: expected one of low, high, got 'medium'"),
])
async def test_a_value_that_does_not_convert_is_refused(engines: EngineFactory, pair: str, problem: str) -> None:
    d, engine = await dispatcher(engines, typed=TYPED)
    [line] = await say(d, f"launch typed {pair}")
    assert line.startswith(problem), line
    assert await engine.instances(include_finished=True) == []


async def test_the_engine_api_converts_text_and_takes_values_of_the_right_type(engines: EngineFactory) -> None:
    engine = await engines({"typed": TYPED})
    iid = await engine.launch("typed", {"count": 3, "ratio": 2, "dry_run": "yes", "version": "2"})
    await engine.idle()
    got = await fields(engine, iid)
    assert (got["count"], got["ratio"], got["dry_run"], got["version"]) == (3, 2.0, True, "2")
    from engine.errors import EngineError
    with pytest.raises(EngineError, match="count: expected a whole number, got True"):
        await engine.launch("typed", {"count": True})


async def test_retry_values_convert_by_the_declared_type_too(engines: EngineFactory) -> None:
    rec = Recorder(mode="fail")
    engine = await engines({"p": """
        inputs: {count: int}
        fields: {count: 1}
        steps:
          - {id: work, participant: rec}
        """}, [rec])
    users = [User("admin", roles={"*": frozenset({"admins"})})]
    d = Dispatcher(engine, Directory(users), default_registry())
    iid = await engine.launch("p")
    await engine.idle()
    assert await say(d, f"retry {iid} count=x") == [f"count: expected a whole number, got 'x'"]
    rec.mode = "done"
    assert await say(d, f"retry {iid} count=7") == [f"retrying #{iid}: work with count set"]
    await engine.idle()
    assert (await fields(engine, iid))["count"] == 7


async def test_a_field_given_twice_is_refused(engines: EngineFactory) -> None:
    d, _ = await dispatcher(engines, untyped=UNTYPED)
    [line] = await say(d, "launch untyped who=a who=b")
    assert line.startswith("field 'who' given twice")


# -- 2. unknown fields are refused, with a did-you-mean ----------------------------------------

async def test_a_misspelt_launch_field_is_refused(engines: EngineFactory) -> None:
    d, engine = await dispatcher(engines, **{"publish-repo": PUBLISH})
    [line] = await say(d, "launch publish-repo rpeo=Project:Devel:Tools")
    assert line == "unknown field 'rpeo' (did you mean 'repo'?)"
    assert await engine.instances(include_finished=True) == []
    [line] = await say(d, "launch publish-repo colour=red")
    assert line == "unknown field 'colour' (known: project, repo)"
    # project= is always allowed, and a field the definition declares (a default in fields) is known
    got = await launched(d, engine, "launch publish-repo repo=tools project=Project:Devel:Tools")
    assert (got["repo"], got["project"]) == ("tools", "Project:Devel:Tools")


async def test_a_field_only_read_by_a_template_is_refused_and_one_a_subprocess_declares_is_known(
        engines: EngineFactory) -> None:
    from engine.errors import EngineError
    engine = await engines({"outer": """
        inputs: {n: int}
        steps:
          - participant: echo
            params: {text: "{{ out | default('none') }}"}
          - if: "n > 0"
            then: [{subprocess: inner}]
        """, "inner": """
        inputs: {deep: str}
        steps:
          - participant: echo
            params: {text: "{{ deep }}"}
        """})
    # reading a field in a template does not declare it: refused, with what is known
    with pytest.raises(EngineError, match=r"^unknown field 'out' \(known: deep, n, project\)$"):
        await engine.launch("outer", {"out": "x", "n": 1})
    with pytest.raises(EngineError, match=r"^unknown field 'nn' \(did you mean 'n'\?\)$"):
        await engine.launch("outer", {"nn": 1})
    with pytest.raises(EngineError, match=r"^unknown field 'dep' \(did you mean 'deep'\?\)$"):
        await engine.launch("outer", {"n": 1, "dep": "y"})
    assert await engine.instances(include_finished=True) == []
    # a field declared by a process it may start is known, and project always is
    iid = await engine.launch("outer", {"n": 1, "deep": "y", "project": "Project:Devel"})
    await engine.idle()
    assert await status(engine, iid) == "completed"
    got = await fields(engine, iid)
    assert (got["n"], got["deep"], got["project"], got["echo"]) == (1, "y", "Project:Devel", "y")


async def test_extra_fields_allow_opens_a_definition(engines: EngineFactory) -> None:
    engine = await engines({"open": "extra_fields: allow\nsteps:\n  - participant: echo\n"})
    iid = await engine.launch("open", {"anything": "goes"})
    await engine.idle()
    assert (await fields(engine, iid))["anything"] == "goes"


async def test_retry_refuses_an_unknown_field(engines: EngineFactory) -> None:
    rec = Recorder(mode="fail")
    engine = await engines({"p": """
        fields: {repo: devel}
        steps:
          - {id: work, participant: rec, params: {text: "{{ repo }}"}}
        """}, [rec])
    users = [User("admin", roles={"*": frozenset({"admins"})})]
    d = Dispatcher(engine, Directory(users), default_registry())
    iid = await engine.launch("p")
    await engine.idle()
    assert await say(d, f"retry {iid} rpeo=x") == ["unknown field 'rpeo' (did you mean 'repo'?)"]
    assert await status(engine, iid) == "failed"


async def test_subprocesses_and_handlers_still_get_all_their_parents_fields(engines: EngineFactory) -> None:
    rec = Recorder()
    engine = await engines({"parent": """
        fields: {a: 1}
        steps:
          - set: {b: 2, c: 3}
          - subprocess: child
        """, "child": """
        steps:
          - {participant: rec}
        """}, [rec])
    await engine.launch("parent")
    await engine.idle()
    [item] = rec.consumed()
    assert dict(item.fields) == {"a": 1, "b": 2, "c": 3}


def test_unknown_fields_for_schedules_at_check_time() -> None:
    from engine.definitions import unknown_fields
    from tests.engine_fixtures import spec_from_yaml
    spec = spec_from_yaml("publish-repo", PUBLISH)
    assert unknown_fields(spec, {"repo": "x", "project": "Project:Devel"}) == []
    assert unknown_fields(spec, {"rpeo": "x", "zzz": 1}) == [
        "unknown field 'rpeo' (did you mean 'repo'?)", "unknown field 'zzz' (known: project, repo)"]


# -- 6. launch --once TOKEN ----------------------------------------------------------------------

async def test_a_launch_with_a_token_happens_once(engines: EngineFactory) -> None:
    d, engine = await dispatcher(engines, **{"publish-repo": PUBLISH})
    assert await say(d, "launch --once rel-1.2 publish-repo repo=devel") == ["launched publish-repo as #1"]
    assert await say(d, "launch --once rel-1.2 publish-repo repo=devel") == ["already launched as #1"]
    assert await say(d, "launch --once rel-1.3 publish-repo repo=devel") == ["launched publish-repo as #2"]
    assert len(await engine.instances(include_finished=True)) == 2
    [line] = await say(d, "launch --once")
    assert line.startswith("--once needs a token and a process")


async def test_a_token_belongs_to_one_process_and_project(engines: EngineFactory) -> None:
    """Another project's launch can neither learn that a token was used (and the instance's id)
    nor use it up for its owner."""
    d, engine = await dispatcher(engines, **{"publish-repo": PUBLISH, "other": """
        project: Other
        launch_roles: [admins]
        steps:
          - participant: echo
        """})
    assert await say(d, "launch --once rel-1.2 other") == ["launched other as #1"]
    assert await say(d, "launch --once rel-1.2 publish-repo repo=devel") == ["launched publish-repo as #2"]
    assert await say(d, "launch --once rel-1.2 publish-repo repo=devel") == ["already launched as #2"]
    assert await say(d, "launch --once rel-1.2 publish-repo repo=devel project=Project:Devel:Tools") == [
        "launched publish-repo as #3"]
