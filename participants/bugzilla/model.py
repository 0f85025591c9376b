"""What the bugzilla participant knows of a bug and of a failed call, apart
from the client (``client`` imports python-bugzilla and requests, which the
bot loads only when a tracker is first used)."""
from __future__ import annotations

from dataclasses import dataclass

# Bugzilla's error codes that concern one bug; the others stop the whole step
BUG_CODES = {100: "not a bug number", 101: "does not exist", 102: "is private (the bot's account may not see it)",
             51: "unknown status or resolution", 113: "private comments are not allowed",
             114: "comment too long", 115: "no permission to change the field",
             121: "resolution rules", 122: "resolution rules", 123: "the workflow refuses the change"}


@dataclass(frozen=True)
class BugState:
    id: int
    status: str
    resolution: str
    product: str
    summary: str


class BugzillaFailure(Exception):
    """A call that failed: ``code`` is Bugzilla's error code (0 when the
    failure is not Bugzilla's answer), ``transient`` when trying later may
    help (network, 5xx).  The message holds no secret."""

    def __init__(self, message: str, code: int = 0, transient: bool = False, brief: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.transient = transient
        self.brief = brief or message         # without the tracker and the call: for a bug's own line

    @property
    def about_bug(self) -> bool:
        return self.code in BUG_CODES
