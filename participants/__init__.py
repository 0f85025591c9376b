"""Workflow steps.  Each module here defines ``Participant`` subclasses with a
``name``; ``discover()`` collects them (a class's ``name`` is its tag)."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

from engine.participants import Participant


def discover() -> list[Participant]:
    found: list[Participant] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for _name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Participant) and cls.__module__ == module.__name__ and cls.name:
                found.append(cls())
    return found
