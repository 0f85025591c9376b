"""The engine's exception tree.  ``EngineError`` messages are user-facing
(one line, nothing changed); anything else is a bug."""
from __future__ import annotations


class EngineError(Exception):
    """A refused request: unknown process or instance, nothing to retry, ..."""


class UnknownProcess(EngineError):
    pass


class NoSuchInstance(EngineError):
    pass


class NotAllowedNow(EngineError):
    """The instance is not in a state that allows this (e.g. cancel a finished one)."""


class NoSuchWorkitem(EngineError):
    """A reply for a workitem that is not open (answered, cancelled or unknown)."""
