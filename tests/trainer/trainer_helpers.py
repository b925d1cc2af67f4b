"""Event sink and control source for running the recipe in-process in tests."""
from __future__ import annotations

import json
from typing import Any

from core.interface import Command


class ListSink:
    """Collects events; each must be JSON-safe, as the worker protocol requires."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, ev: dict[str, Any]) -> None:
        json.dumps(ev, allow_nan=False)
        self.events.append(ev)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]


class NoControl:
    def poll(self) -> None:
        return None

    def wait(self, timeout: float) -> None:
        return None


class StopAfter:
    """A real ControlSource: STOP once the step event *n* was emitted into *sink*."""

    def __init__(self, sink: ListSink, n: int) -> None:
        self.sink, self.n, self.sent = sink, n, False

    def poll(self) -> Command | None:
        steps = self.sink.of("step")
        if not self.sent and steps and steps[-1]["step"] == self.n:
            self.sent = True
            return Command.STOP
        return None

    def wait(self, timeout: float) -> Command | None:
        return self.poll()
