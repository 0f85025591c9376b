"""Workflow steps.  Each module here defines ``Participant`` subclasses with a
``name``; ``discover()`` collects them (a class's ``name`` is its tag), and
those of installed packages that declare the entry-point group
``releasebot.participants``:

    [project.entry-points."releasebot.participants"]
    bugzilla = "releasebot_bugzilla:Bugzilla"       # a Participant subclass
    extras = "releasebot_extras.steps"              # or a module: all of its participants

Such a package imports only ``engine`` (as the participants here do).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import pkgutil
from types import ModuleType
from typing import Any, Iterable

from engine.participants import DiscoveryError, Participant

ENTRY_POINT_GROUP = "releasebot.participants"


def discover(entry_points: Iterable[importlib.metadata.EntryPoint] | None = None) -> list[Participant]:
    """One instance of every participant: this package's modules, then the
    entry points (``entry_points``: those of the installed packages by
    default).  Raises DiscoveryError for an entry point that does not load
    or a name taken twice."""
    found: list[Participant] = []
    where: dict[str, str] = {}

    def add(participant: Participant, source: str) -> None:
        if participant.name in where:
            raise DiscoveryError(f"participant {participant.name!r} is defined twice: by {where[participant.name]} "
                                 f"and by {source}")
        where[participant.name] = source
        found.append(participant)

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for cls in _participants_in(module):
            add(cls(), f"{module.__name__}.{cls.__name__}")
    points = entry_points if entry_points is not None else importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for point in sorted(points, key=lambda p: p.name):
        source = f"entry point {point.name} = {point.value} ({ENTRY_POINT_GROUP})"
        try:
            loaded: Any = point.load()
        except Exception as exc:
            raise DiscoveryError(f"{source} does not load: {type(exc).__name__}: {exc}") from None
        if isinstance(loaded, ModuleType):
            classes = _participants_in(loaded)
        elif inspect.isclass(loaded) and issubclass(loaded, Participant) and loaded.name:
            classes = [loaded]
        else:
            raise DiscoveryError(f"{source} is neither a Participant subclass with a name nor a module")
        if not classes:
            raise DiscoveryError(f"{source} defines no participant")
        for cls in classes:
            try:
                add(cls(), source)
            except DiscoveryError:
                raise
            except Exception as exc:
                raise DiscoveryError(f"{source}: {cls.__name__}() failed: {type(exc).__name__}: {exc}") from None
    return found


def _participants_in(module: ModuleType) -> list[type[Participant]]:
    """The participants a module defines; for a package (``participants/repo/``),
    those its ``__init__`` imports from its own modules."""
    own = module.__name__
    inside = own + "." if hasattr(module, "__path__") else None
    return [cls for _name, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, Participant) and cls.name
            and (cls.__module__ == own or (inside is not None and cls.__module__.startswith(inside)))]
