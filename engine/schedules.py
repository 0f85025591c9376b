"""Cron schedules: what launches a process at fixed times (the spec; the engine arms them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    cron: str
    process: str
    fields: Mapping[str, Any]
    misfire: str = "run_once"     # run_once | skip: what to do with a run missed while down
    timezone: str = "UTC"

    @property
    def rule(self) -> str:
        """What decides the run times; stored, so a changed cron or time zone re-arms."""
        return self.cron if self.timezone == "UTC" else f"{self.cron} ({self.timezone})"
