"""What the chat benchmarks answer ``ps`` from: a real engine on a real
SQLite file with a few waiting instances, as the bot runs it."""
from __future__ import annotations

from pathlib import Path

from engine.definitions import parse_definition
from engine.engine import Engine
from engine.participants import ParticipantRegistry
from engine.yamlconfig import loads_yaml
from engine.store import Store
from participants import discover

WAITING = """\
name: waits
inputs: {n: int}
steps:
  - id: approve
    participant: hold
"""
INSTANCES = 3          # ps answers with 3 lines: below max_room_lines, so in the channel


async def ps_engine(directory: Path) -> tuple[Engine, Store]:
    registry = ParticipantRegistry(discover())
    spec, problems = parse_definition(loads_yaml(WAITING, "waits.yaml"), "waits.yaml", "waits", registry.names())
    assert spec is not None, problems
    store = Store(directory / "bench.sqlite3")
    store.open()
    engine = Engine(store, {"waits": spec}, registry)
    await engine.start()
    for i in range(INSTANCES):
        await engine.launch("waits", {"n": i}, actor="bench")
    assert len(await engine.instances()) == INSTANCES
    return engine, store


async def close(engine: Engine, store: Store) -> None:
    await engine.stop()
    store.close()
