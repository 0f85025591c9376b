"""Editing or removing a process definition never strands the instances
already running it: each keeps the version it was launched with."""
from __future__ import annotations

from engine.definitions import ProcessSpec, parse_definition
from engine.engine import Engine
from engine.participants import ParticipantRegistry, Reply
from engine.yamlconfig import loads_yaml
from participants import discover
from tests.engine_fixtures import EngineFactory, close_engine

V1 = """name: release
steps:
  - id: approve
    participant: hold
  - id: say
    participant: echo
    params: {text: "old way"}
"""
V2 = """name: release
steps:
  - id: prepare
    set: {prepared: true}
  - id: approve
    participant: hold
  - concurrence:
      - participant: echo
        params: {text: "new way"}
      - set: {extra: 1}
"""


def specs(*texts: str) -> dict[str, ProcessSpec]:
    registry = ParticipantRegistry(discover())
    out = {}
    for text in texts:
        spec, problems = parse_definition(loads_yaml(text, "release.yaml"), "release.yaml", "release",
                                          registry.names(), text)
        assert spec is not None, problems
        out[spec.name] = spec
    return out


async def start(engines: EngineFactory, definitions: dict[str, ProcessSpec]) -> Engine:
    return await engines(specs=definitions, registry=ParticipantRegistry(discover()))


async def stop(engine: Engine) -> None:
    await engine.idle()
    await close_engine(engine)


async def answer_all(engine: Engine) -> None:
    for item in await engine.pending():
        await engine.reply(item.key, Reply.done({"ok": True}), actor="alice")
    await engine.idle()


async def test_an_edited_definition_leaves_running_instances_on_their_version(engines: EngineFactory) -> None:
    engine = await start(engines, specs(V1))
    old = await engine.launch("release")
    await stop(engine)

    engine = await start(engines, specs(V2))
    assert (await engine.instances())[0].waiting_on == "approve pending"
    new = await engine.launch("release")
    await engine.idle()
    await answer_all(engine)
    old_detail = await engine.describe(old)
    assert old_detail.summary.status == "completed"
    assert old_detail.fields == {"ok": True, "echo": "old way"}
    new_detail = await engine.describe(new)
    assert new_detail.summary.status == "completed"
    assert new_detail.fields == {"prepared": True, "ok": True, "echo": "new way", "extra": 1}
    await stop(engine)


async def test_a_removed_definition_still_finishes_its_instances(engines: EngineFactory) -> None:
    engine = await start(engines, specs(V1))
    iid = await engine.launch("release")
    await stop(engine)

    engine = await start(engines, {})
    assert "release" not in engine.specs
    await answer_all(engine)
    detail = await engine.describe(iid)
    assert detail.summary.status == "completed"
    assert detail.fields["echo"] == "old way"
    await stop(engine)
