"""Pytest fixtures around the real-server kit (``tests/serverkit``), one
plugin module per protocol, registered in ``tests/conftest.py``.

A server whose binary is missing skips its tests on a laptop, but fails
them under CI (CI=true): a test that silently skips in CI proves nothing.
"""
from __future__ import annotations

import os
from typing import Callable, TypeVar

import pytest

from tests.serverkit import ServerMissing, free_port, stop, wait_port

__all__ = ["ServerMissing", "free_port", "need", "require_binary", "stop", "wait_port"]

T = TypeVar("T")


def need(start: Callable[[], T]) -> T:
    """``start()``, with a missing server turned into a skip (a failure under CI)."""
    try:
        return start()
    except ServerMissing as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def require_binary(name: str) -> str:
    """The path of a server binary the test needs (skip or fail without it)."""
    from tests.serverkit import require_binary as find

    return need(lambda: find(name))
