"""The Evaluator protocol: a scorer that reads a cycle's runs and returns named scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from daemon.records import Run, Score


class Evaluator(Protocol):
    name: str

    def score(self, runs: Sequence[Run]) -> list[Score]:
        """Return scores per task, per domain and for the whole cycle."""
        ...
