"""The Backend protocol every model runtime implements, and its records."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from lora.layers import LayerScales


@dataclass(frozen=True)
class SamplingParams:
    """How to sample a completion. temperature 0 means greedy decoding."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    max_tokens: int = 64
    repeat_penalty: float = 1.1
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Generation:
    """One completion and what it cost."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    wall_seconds: float
    finish_reason: str  # "stop" (a stop string or end of text) or "length"

    @property
    def tokens_per_second(self) -> float:
        if self.wall_seconds <= 0:
            return 0.0
        return self.completion_tokens / self.wall_seconds


@dataclass(frozen=True)
class LogLikelihood:
    """Sum of natural-log probabilities of a text's tokens under the model.

    The first token is conditioned on the beginning-of-sequence token only, so
    `tokens` counts every token of the text.
    """

    total: float
    tokens: int

    @property
    def perplexity(self) -> float:
        if self.tokens == 0:
            return float("nan")
        return math.exp(-self.total / self.tokens)


@dataclass(frozen=True)
class ActiveAdapter:
    """A LoRA adapter to apply at inference, with its scale (negative subtracts it) and,
    optionally, factors per layer and module on top of the scale (lora/layers.py)."""

    path: Path
    scale: float = 1.0
    name: str = ""
    layers: LayerScales | None = None

    @property
    def adapter_name(self) -> str:
        return self.name or self.path.name


@dataclass(frozen=True)
class MemoryUsage:
    """Memory of the process that hosts the backend, in bytes."""

    rss_bytes: int
    peak_rss_bytes: int
    model_file_bytes: int
    details: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """A loaded model that can generate, score text and switch LoRA adapters."""

    name: str
    model_path: Path

    def generate(self, prompt: str, params: SamplingParams) -> Generation: ...

    def log_likelihood(self, text: str) -> LogLikelihood: ...

    def set_adapters(self, adapters: Sequence[ActiveAdapter]) -> None: ...

    def prefetch_adapters(self, adapters: Sequence[ActiveAdapter]) -> list[Path]:
        """Load adapters that will be used soon, as far as memory allows, without
        applying them; return the files now loaded. A hint: an adapter that cannot be
        loaded is skipped with a warning, and `set_adapters` reports it when used."""
        ...

    def pin_adapters(self, adapters: Sequence[ActiveAdapter]) -> list[Path]:
        """Keep these adapters loaded, and only these, until the next call; return the
        files now pinned. One that cannot be pinned is skipped with a warning."""
        ...

    def memory(self) -> MemoryUsage: ...

    def close(self) -> None: ...
