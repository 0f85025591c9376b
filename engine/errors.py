"""The bot's exception tree, rooted here in the innermost layer.

``ReleasebotError`` is the root of every error the bot raises on purpose.
``Refusal`` is the user-facing branch: a request refused with one line of
explanation, having changed nothing (the engine's ``EngineError``, the
dispatcher's ``CommandError`` and its ``NotAuthorised``).  Anything that is
not a ``Refusal`` and reaches the dispatcher is a bug, logged with its
traceback.  Outer layers add their own subclasses (``bot.access.NotAuthorised``,
``bot.chat.TransportError``); callers pick a log level by class, never by
matching message text.
"""
from __future__ import annotations


class ReleasebotError(Exception):
    """Root of the bot's own errors."""


class Refusal(ReleasebotError):
    """A request refused: one line for the person who asked; nothing changed."""


class EngineError(Refusal):
    """A refused engine request: unknown process or instance, nothing to retry, ..."""


class UnknownProcess(EngineError):
    pass


class NoSuchInstance(EngineError):
    pass


class NotAllowedNow(EngineError):
    """The instance is not in a state that allows this (e.g. cancel a finished one)."""


class NoSuchWorkitem(EngineError):
    """A reply for a workitem that is not open (answered, cancelled or unknown)."""


class BadFields(EngineError):
    """Launch or retry fields the definition does not know, or values that do not convert."""


class AlreadyLaunched(EngineError):
    """A launch token was used already (within a week): the launch is not repeated."""

    def __init__(self, instance_id: int) -> None:
        super().__init__(f"already launched as #{instance_id}")
        self.instance_id = instance_id
