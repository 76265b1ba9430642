"""`a3x bench adapters`: the cost of switching, loading and combining LoRA adapters.

One run on one backend measures, side by side:

- latency (p50, p99) of `set_adapters` for (a) one resident adapter, (b) one
  adapter loaded from disk first, (c) three resident adapters at once, with
  1, 10 and 100 adapters registered in a temporary adapter registry and
  prefetched as far as the adapter budget allows;
- latency of loading an adapter of about 8 MB from disk, with the file in
  the page cache and after dropping it from the page cache;
- latency (p50, p99) of routing a task prompt and activating the adapters
  that the router picks, with the same 1, 10 and 100 adapters registered;
- the extra time of the first decode after a switch, which llama.cpp spends
  re-reserving its compute graph;
- generation throughput with 0, 1 and 3 adapters active, interleaved prompt
  by prompt, as ratios to 0 adapters.

The adapters are synthetic: random factors on the attention projections
(q, k, v, o) of every block, with small `lora_b` so that the model's text
stays close to the base's. For routing, each adapter gets the routing
profile of one training text of the shipped task books (see
`SyntheticRoutes`), and the routed prompts are the books' task prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.generate import SideResult, benchmark_prompts, machine_description
from runtime.backend import ActiveAdapter, SamplingParams
from runtime.gguf_file import GGUFInfo

if TYPE_CHECKING:
    from lora.metadata import AdapterMetadata
    from lora.router import Router, TextEmbedder
    from runtime.llama_cpp_backend import LlamaCppBackend

ATTENTION_MODULES = ("attn_q", "attn_k", "attn_v", "attn_output")
# Rank 22 on q, k, v, o of Gemma 3 270M is 8.1 MB in float32, the size the
# load target is stated for; rank 8 is 2.9 MB.
DEFAULT_RANK, DEFAULT_LARGE_RANK = 8, 22
DEFAULT_COUNTS = (1, 10, 100)
TARGET_SWITCH_P99_MS = 1.0
TARGET_LOAD_P99_MS = 10.0
TARGET_ROUTE_P99_MS = 20.0
TARGET_ONE_ADAPTER_RATIO = 0.9
SWITCH_PROMPT = "The capital of France is"


# Synthetic adapters


def write_synthetic_adapter(
    path: Path,
    base: GGUFInfo,
    rank: int,
    seed: int,
    modules: Sequence[str] = ATTENTION_MODULES,
    blocks: Sequence[int] | None = None,
    b_std: float = 0.01,
    metadata: AdapterMetadata | None = None,
) -> Path:
    """Write a float32 GGUF LoRA adapter with random factors for `base`.

    Each tensor's factors depend only on (seed, block, module), so an adapter
    written for fewer blocks or modules holds the same factors as the full
    one for those it has. `lora_a` has rows of norm about 1 and `lora_b`
    entries of standard deviation `b_std`; alpha equals the rank, so
    llama.cpp applies `lora_b @ lora_a` unscaled.
    """
    import gguf

    from lora.metadata import add_to_gguf_writer

    shapes = {tensor.name: tensor.shape for tensor in base.tensors}
    writer = gguf.GGUFWriter(str(path), base.architecture)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    if metadata is not None:
        add_to_gguf_writer(writer, metadata)
    for block in range(base.block_count or 0) if blocks is None else blocks:
        for module in modules:
            target = f"blk.{block}.{module}.weight"
            if target not in shapes:
                raise ValueError(f"base {base.path} has no tensor '{target}' to adapt")
            columns, rows = shapes[target][0], shapes[target][1]  # GGUF order: in, out
            rng = np.random.default_rng([seed, block, zlib.crc32(module.encode())])
            a = rng.standard_normal((rank, columns)) / np.sqrt(columns)
            b = rng.standard_normal((rows, rank)) * b_std
            writer.add_tensor(f"{target}.lora_a", a.astype(np.float32))
            writer.add_tensor(f"{target}.lora_b", b.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def register_adapters(root: Path, base: GGUFInfo, count: int, rank: int) -> list[Path]:
    """Create `count` accepted adapters in an adapter registry; return their GGUF paths."""
    from lora.registry import AdapterRegistry, AdapterStatus

    registry = AdapterRegistry(root)
    paths = []
    for index in range(count):
        adapter = registry.create(f"synthetic{index:03d}", {"reason": "adapter benchmark"})
        write_synthetic_adapter(adapter.gguf_path, base, rank, seed=index)
        registry.set_status(adapter, AdapterStatus.ACCEPTED)
        paths.append(adapter.gguf_path)
    return paths


# Records


@dataclass
class Latency:
    """Samples of one operation, in milliseconds of wall time.

    `cpu_samples_ms`, where recorded, is the process CPU time of the same
    samples. With one thread it is the compute alone and does not grow when
    other processes take the CPU; with more threads it also counts threads
    spinning while they wait for each other.
    """

    samples_ms: list[float] = field(default_factory=list)
    cpu_samples_ms: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return float(np.percentile(self.samples_ms, 50)) if self.samples_ms else float("nan")

    @property
    def p99(self) -> float:
        return float(np.percentile(self.samples_ms, 99)) if self.samples_ms else float("nan")

    @property
    def cpu_p50(self) -> float:
        samples = self.cpu_samples_ms
        return float(np.percentile(samples, 50)) if samples else float("nan")

    def to_json(self) -> dict[str, float | int]:
        data: dict[str, float | int] = {
            "count": len(self.samples_ms),
            "p50_ms": self.p50,
            "p99_ms": self.p99,
        }
        if self.cpu_samples_ms:
            data["cpu_p50_ms"] = self.cpu_p50
        return data


@dataclass
class PopulationResult:
    """Latencies with `registered` adapters in the registry, `resident` of them loaded."""

    registered: int
    resident: int
    activate: Latency
    load: Latency
    combine: Latency | None  # None with fewer than 3 resident adapters
    route: Latency | None = None  # None when routing was not measured
    route_embed: Latency | None = None  # the prompt embedding within each route sample
    # How many adapters each timed routing decision activated, in sample order.
    routed_counts: list[int] = field(default_factory=list)

    def routed_histogram(self) -> dict[int, int]:
        """Return the number of routing decisions per count of adapters activated."""
        return {count: self.routed_counts.count(count) for count in sorted(set(self.routed_counts))}

    def to_json(self) -> dict[str, Any]:
        return {
            "registered": self.registered,
            "resident": self.resident,
            "activate": self.activate.to_json(),
            "load": self.load.to_json(),
            "combine": self.combine.to_json() if self.combine else None,
            "route": self.route.to_json() if self.route else None,
            "route_embed": self.route_embed.to_json() if self.route_embed else None,
            "routed_adapters": {
                str(count): decisions for count, decisions in self.routed_histogram().items()
            },
        }


@dataclass
class LoadBreakdown:
    """The parts of loading one adapter from disk, each timed with the page cache dropped."""

    validate: Latency  # Python: header scan and structure check against the base
    read: Latency  # reading the whole file, as a floor for any loader
    init: Latency  # llama_adapter_lora_init: header, allocation, tensor reads

    def to_json(self) -> dict[str, Any]:
        return {
            "validate": self.validate.to_json(),
            "read": self.read.to_json(),
            "init": self.init.to_json(),
        }


@dataclass
class AdapterBenchmark:
    model: str
    machine: str
    threads: int
    budget_bytes: int
    rank: int
    adapter_bytes: int
    large_rank: int
    large_adapter_bytes: int
    populations: list[PopulationResult]
    load_large_warm: Latency
    load_large_cold: Latency
    load_large_parts: LoadBreakdown
    decode_plain: Latency
    decode_switch_extra: Latency  # extra time of the first decode after a switch
    decode_step: dict[int, Latency]  # active adapter count -> one generation step
    throughput: dict[int, SideResult]  # active adapter count -> tokens and seconds

    def ratio(self, active: int) -> float:
        """Return end-to-end tokens/s with `active` adapters over tokens/s with none."""
        base = self.throughput[0].tokens_per_second
        return self.throughput[active].tokens_per_second / base if base else 0.0

    def step_ratio(self, active: int, cpu: bool = False) -> float:
        """Return the median step time (wall or CPU) with no adapter over that with
        `active` adapters: the ratio of generation speeds at steady state."""
        base, adapted = self.decode_step[0], self.decode_step[active]
        return base.cpu_p50 / adapted.cpu_p50 if cpu else base.p50 / adapted.p50

    def verdicts(self) -> list[tuple[str, float, float, bool]]:
        """Return (measurement, value, target, met) for every stated target."""
        rows = []
        switch, load = TARGET_SWITCH_P99_MS, TARGET_LOAD_P99_MS
        for population in self.populations:
            n = population.registered
            rows.append((f"activate p99 ms, {n} registered", population.activate.p99, switch))
            if population.combine is not None:
                rows.append((f"combine 3 p99 ms, {n} registered", population.combine.p99, switch))
            if population.route is not None:
                route = (f"route + activate p99 ms, {n} registered", population.route.p99)
                rows.append((*route, TARGET_ROUTE_P99_MS))
        size = f"{self.large_adapter_bytes / 1e6:.1f} MB"
        rows.append((f"load {size} + activate p99 ms, page cache", self.load_large_warm.p99, load))
        rows.append((f"load {size} + activate p99 ms, disk", self.load_large_cold.p99, load))
        verdicts = [(name, value, target, value <= target) for name, value, target in rows]
        for name, ratio in (
            ("tokens/s with 1 adapter / base, generation", self.ratio(1)),
            ("tokens/s with 1 adapter / base, median step", self.step_ratio(1)),
            ("tokens/s with 1 adapter / base, median step CPU time", self.step_ratio(1, cpu=True)),
        ):
            target = TARGET_ONE_ADAPTER_RATIO
            verdicts.append((name, ratio, target, ratio >= target))
        return verdicts

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "machine": self.machine,
            "threads": self.threads,
            "budget_bytes": self.budget_bytes,
            "rank": self.rank,
            "adapter_bytes": self.adapter_bytes,
            "large_rank": self.large_rank,
            "large_adapter_bytes": self.large_adapter_bytes,
            "populations": [population.to_json() for population in self.populations],
            "load_large_warm": self.load_large_warm.to_json(),
            "load_large_cold": self.load_large_cold.to_json(),
            "load_large_parts": self.load_large_parts.to_json(),
            "decode_plain": self.decode_plain.to_json(),
            "decode_switch_extra": self.decode_switch_extra.to_json(),
            "decode_step": {
                str(count): {
                    **latency.to_json(),
                    "ratio": self.step_ratio(count),
                    "cpu_ratio": self.step_ratio(count, cpu=True),
                }
                for count, latency in self.decode_step.items()
            },
            "throughput": {
                str(count): {
                    "tokens": side.tokens,
                    "seconds": side.seconds,
                    "tokens_per_second": side.tokens_per_second,
                    "ratio": self.ratio(count),
                }
                for count, side in self.throughput.items()
            },
            "verdicts": [
                {"measurement": name, "value": value, "target": target, "met": met}
                for name, value, target, met in self.verdicts()
            ],
        }


# Measurements


def _time_ms(action: Callable[..., object], *args: Any) -> float:
    started = time.perf_counter_ns()
    action(*args)
    return (time.perf_counter_ns() - started) / 1e6


def _time_wall_and_cpu(action: Callable[[], object]) -> tuple[float, float]:
    started, cpu_started = time.perf_counter_ns(), time.process_time_ns()
    action()
    return (time.perf_counter_ns() - started) / 1e6, (time.process_time_ns() - cpu_started) / 1e6


def _use(paths: Sequence[Path]) -> list[ActiveAdapter]:
    return [ActiveAdapter(path) for path in paths]


def _unload_all(backend: LlamaCppBackend) -> None:
    backend.set_adapters([])
    for entry in backend.adapter_cache.entries():
        backend.adapter_cache.evict(entry.path)


def measure_activate(backend: LlamaCppBackend, resident: list[Path], samples: int) -> Latency:
    """Time switches to one resident adapter, a different one each time."""
    latency = Latency()
    for index in range(samples):
        if len(resident) == 1:
            backend.set_adapters([])  # the only adapter: switch away from it, untimed
        target = resident[index % len(resident)]
        latency.samples_ms.append(_time_ms(backend.set_adapters, _use([target])))
    return latency


def measure_combine(backend: LlamaCppBackend, resident: list[Path], samples: int) -> Latency | None:
    """Time switches to three resident adapters at once, a different triple each time."""
    if len(resident) < 3:
        return None
    latency = Latency()
    for index in range(samples):
        if len(resident) == 3:
            backend.set_adapters([])  # the only triple: switch away from it, untimed
        triple = [resident[(index + offset) % len(resident)] for offset in range(3)]
        latency.samples_ms.append(_time_ms(backend.set_adapters, _use(triple)))
    return latency


def measure_load(
    backend: LlamaCppBackend, paths: list[Path], samples: int, cold: bool = False
) -> Latency:
    """Time activating an adapter that is not resident, so that it is read from its file.

    A resident target is evicted first, untimed; when the budget is full, the
    timed call evicts the least recently used adapter itself. With `cold`,
    the file is also dropped from the page cache (posix_fadvise DONTNEED).
    """
    cache = backend.adapter_cache
    latency = Latency()
    for index in range(samples):
        absent = [path for path in paths if not cache.is_resident(path)]
        target = absent[index % len(absent)] if absent else paths[index % len(paths)]
        if target in cache.active:
            backend.set_adapters([])
        cache.evict(target)
        if cold:
            _drop_page_cache(target)
        latency.samples_ms.append(_time_ms(backend.set_adapters, _use([target])))
    return latency


def measure_load_parts(backend: LlamaCppBackend, path: Path, samples: int) -> LoadBreakdown:
    """Time validation, a plain read of the file and llama.cpp's load, each from disk."""
    parts = LoadBreakdown(Latency(), Latency(), Latency())
    for _ in range(samples):
        _drop_page_cache(path)
        parts.validate.samples_ms.append(_time_ms(backend._inspect_adapter, path))
        _drop_page_cache(path)
        parts.read.samples_ms.append(_time_ms(path.read_bytes))
        _drop_page_cache(path)
        started = time.perf_counter_ns()
        handle = backend._init_adapter(path)
        parts.init.samples_ms.append((time.perf_counter_ns() - started) / 1e6)
        backend._llama_cpp.llama_adapter_lora_free(handle)
    return parts


def measure_population(
    backend: LlamaCppBackend,
    paths: list[Path],
    samples: int,
    load_samples: int,
    routes: SyntheticRoutes | None = None,
) -> PopulationResult:
    """Prefetch what fits of `paths`, then time activating, loading, combining and,
    with `routes`, routing a prompt and activating what the router picks."""
    from lora.gguf_adapter import read_gguf_adapter

    _unload_all(backend)
    each = read_gguf_adapter(paths[0], load_tensors=False).resident_bytes
    capacity = backend.adapter_cache.budget_bytes // each  # the adapters are equal in size
    resident = backend.adapter_cache.prefetch(paths[:capacity])
    activate = measure_activate(backend, resident, samples)
    combine = measure_combine(backend, resident, samples)
    load = measure_load(backend, paths, load_samples)
    result = PopulationResult(len(paths), len(resident), activate, load, combine)
    if routes is not None:
        route = routes.route_for(paths)
        result.route = measure_route_and_activate(backend, route, routes.prompts, samples)
        result.route_embed = route.embed
        result.routed_counts = route.counts
    return result


class _PromptDecoder:
    """Decodes a short prompt from an empty KV cache, and one generation step after it."""

    def __init__(self, backend: LlamaCppBackend):
        from llama_cpp import _internals

        self.backend = backend
        self.tokens = backend.llm.tokenize(SWITCH_PROMPT.encode(), add_bos=True, special=False)
        self.batch = _internals.LlamaBatch(
            n_tokens=len(self.tokens), embd=0, n_seq_max=1, verbose=False
        )

    def prompt(self) -> None:
        self.backend._reset_context()
        self.batch.set_batch(self.tokens, n_past=0, logits_all=False)
        self.backend.llm._ctx.decode(self.batch)

    def step(self) -> None:
        self.batch.set_batch(self.tokens[-1:], n_past=len(self.tokens), logits_all=False)
        self.backend.llm._ctx.decode(self.batch)

    def close(self) -> None:
        self.batch.close()


def measure_switch_decode(
    backend: LlamaCppBackend, pair: tuple[Path, Path], samples: int
) -> tuple[Latency, Latency]:
    """Time a short prompt decode, and how much longer it takes right after a switch.

    llama.cpp marks its compute graph for re-reservation when the adapter set
    changes and does that work in the next decode, so a switch costs more
    than `set_adapters` itself. Each sample is the difference of two decodes
    next to each other in time, one without and one after a switch, so that
    load from other processes mostly cancels.
    """
    decoder = _PromptDecoder(backend)
    plain, extra = Latency(), Latency()
    try:
        backend.set_adapters(_use([pair[0]]))
        decoder.prompt()
        for index in range(samples):
            wall, cpu = _time_wall_and_cpu(decoder.prompt)
            backend.set_adapters(_use([pair[(index + 1) % 2]]))
            wall_after, cpu_after = _time_wall_and_cpu(decoder.prompt)
            plain.samples_ms.append(wall)
            plain.cpu_samples_ms.append(cpu)
            extra.samples_ms.append(wall_after - wall)
            extra.cpu_samples_ms.append(cpu_after - cpu)
    finally:
        decoder.close()
    return plain, extra


def measure_decode_step(
    backend: LlamaCppBackend, sides: dict[int, list[Path]], samples: int
) -> dict[int, Latency]:
    """Time one generation step (a one-token decode with logits) per adapter set.

    The sides take turns sample by sample, and the step is timed after the
    prompt decode that pays for the switch, so the median is the steady cost
    of generating a token with that many adapters.
    """
    decoder = _PromptDecoder(backend)
    steps = {count: Latency() for count in sides}
    order = list(sides)
    try:
        for index in range(samples):
            for count in order[index % len(order) :] + order[: index % len(order)]:
                backend.set_adapters(_use(sides[count]))
                decoder.prompt()
                wall, cpu = _time_wall_and_cpu(decoder.step)
                steps[count].samples_ms.append(wall)
                steps[count].cpu_samples_ms.append(cpu)
    finally:
        decoder.close()
    return steps


def measure_throughput(
    backend: LlamaCppBackend,
    sides: dict[int, list[Path]],
    prompts: list[str],
    max_tokens: int,
    rounds: int,
) -> dict[int, SideResult]:
    """Generate greedily with each adapter set in turn, prompt by prompt.

    The order of the sides rotates with every prompt, so machine noise hits
    them alike. Every generation follows a switch of adapters, so each side
    pays the re-reservation of llama.cpp's graph once per prompt.
    """
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, repeat_penalty=1.0, seed=0)
    results = {count: SideResult() for count in sides}
    order = list(sides)
    turn = 0
    for _ in range(rounds):
        for prompt in prompts:
            for count in order[turn % len(order) :] + order[: turn % len(order)]:
                backend.set_adapters(_use(sides[count]))
                started = time.perf_counter()
                generation = backend.generate(prompt, params)
                results[count].seconds += time.perf_counter() - started
                results[count].tokens += generation.completion_tokens
            turn += 1
    return results


def measure_route_and_activate(
    backend: LlamaCppBackend,
    route: Callable[[str], Sequence[ActiveAdapter]],
    prompts: Sequence[str],
    samples: int,
) -> Latency:
    """Time `route(prompt)` followed by `set_adapters` of its result.

    This is the hook for a router: any callable from prompt text to the
    adapters to apply can be timed here, with the same percentiles.
    """
    latency = Latency()
    for index in range(samples):
        prompt = prompts[index % len(prompts)]
        latency.samples_ms.append(_time_ms(_route_and_activate, backend, route, prompt))
    return latency


def _route_and_activate(
    backend: LlamaCppBackend, route: Callable[[str], Sequence[ActiveAdapter]], prompt: str
) -> None:
    backend.set_adapters(route(prompt))


# Routing over synthetic adapters


def routing_texts(books: Sequence[Path]) -> tuple[list[str], list[tuple[str, str]]]:
    """Return the task prompts of `books`, and (domain, text) for their training texts.

    A domain's training texts are what its routing profile is built from:
    the prompts of its tasks that are not held out, then its corpus training
    paragraphs. The domains take turns in the list, so that the first few
    adapters already cover every domain.
    """
    from daemon.taskbook import load_books
    from lora.router import book_groups

    book = load_books(books)
    queues: dict[str, list[str]] = {}
    for name, domain in sorted(book.domains.items()):
        tasks = [task for task in book.tasks if task.domain == name]
        prompts, paragraphs = book_groups(tasks, domain.reference_corpus)
        queues[name] = [text for text in prompts + paragraphs if text.strip()]
    texts: list[tuple[str, str]] = []
    for position in range(max(len(queue) for queue in queues.values())):
        texts.extend(
            (name, queue[position]) for name, queue in queues.items() if position < len(queue)
        )
    return [task.prompt for task in book.tasks], texts


class TimedEmbedder:
    """An embedder that passes `encode` on and records the wall time of each call."""

    def __init__(self, embedder: TextEmbedder):
        self.embedder = embedder
        self.dimension = embedder.dimension
        self.identity = embedder.identity
        self.latency = Latency()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        started = time.perf_counter_ns()
        vectors = self.embedder.encode(texts)
        self.latency.samples_ms.append((time.perf_counter_ns() - started) / 1e6)
        return vectors


@dataclass
class RecordingRoute:
    """A route from prompt text to adapters that records how many each decision picked
    and, in `embed`, how long embedding each prompt took."""

    router: Router
    paths: dict[str, Path]  # profile name -> adapter file
    embed: Latency
    counts: list[int] = field(default_factory=list)

    def __call__(self, prompt: str) -> list[ActiveAdapter]:
        decision = self.router.route(prompt)
        self.counts.append(len(decision.adapters))
        return [ActiveAdapter(self.paths[name], weight) for name, weight, _ in decision.adapters]


class SyntheticRoutes:
    """Routers over synthetic adapters, with the daemon's router and default settings.

    Adapter i gets the embedding of training text i of `routing_texts` as its
    profile. A trained adapter's profile averages many such texts, which
    changes which adapters a prompt picks, but not the work of the router:
    embedding the prompt, a FAISS search over every profile and a softmax.
    """

    def __init__(self, embedder: TextEmbedder, books: Sequence[Path], count: int):
        """Embed the first `count` training texts of `books`, one per adapter to route to."""
        self.embedder = embedder
        self.prompts, texts = routing_texts(books)
        if count > len(texts):
            raise ValueError(
                f"routing profiles come from the {len(texts)} training texts of the shipped "
                f"task books, too few for {count} registered adapters; measure at most "
                f"{len(texts)}, or leave routing out with --no-route"
            )
        self.domains = [domain for domain, _ in texts[:count]]
        # Embedding the texts also warms up the model before any timed routing.
        self.vectors = embedder.encode([text for _, text in texts[:count]])

    def route_for(self, paths: Sequence[Path]) -> RecordingRoute:
        """Build a router over the first len(paths) profiles, one per adapter file."""
        from lora.router import SOURCE_TRAINING_SET, Profile, Router, RouterSettings

        if len(paths) > len(self.vectors):
            raise ValueError(
                f"{len(paths)} adapters to route to, but only {len(self.vectors)} profiles were "
                f"embedded; create SyntheticRoutes with a count of at least {len(paths)}"
            )
        names = [f"synthetic{index:03d}" for index in range(len(paths))]
        profiles = [
            Profile(name, self.domains[index], self.vectors[index], SOURCE_TRAINING_SET, 1)
            for index, name in enumerate(names)
        ]
        embedder = TimedEmbedder(self.embedder)
        router = Router(profiles, embedder, RouterSettings())
        return RecordingRoute(router, dict(zip(names, paths, strict=True)), embedder.latency)


def _drop_page_cache(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


# The run


@dataclass(frozen=True)
class BenchSettings:
    counts: tuple[int, ...] = DEFAULT_COUNTS
    rank: int = DEFAULT_RANK
    large_rank: int = DEFAULT_LARGE_RANK
    samples: int = 200
    load_samples: int = 50
    decode_samples: int = 60
    prompts: int = 8
    max_tokens: int = 64
    rounds: int = 2
    n_ctx: int = 2048
    budget_bytes: int = 256 * 2**20
    route: bool = True  # time routing, which loads the MiniLM embedding model


def run_benchmark(
    model: Path, threads: int, settings: BenchSettings, embedder: TextEmbedder | None = None
) -> AdapterBenchmark:
    """Run every measurement on one backend over adapters in a temporary folder.

    With `settings.route`, prompts are embedded by `embedder`, by default the
    router's MiniLM (int8, 128 word pieces) with `threads` torch threads.
    """
    from runtime.llama_cpp_backend import LlamaCppBackend

    routes = None
    if settings.route:
        from bench.routing import shipped_books
        from knowledge.embed import ROUTING_MAX_TOKENS, Embedder

        embedder = embedder or Embedder(
            threads=threads, max_tokens=ROUTING_MAX_TOKENS, quantized=True
        )
        routes = SyntheticRoutes(embedder, shipped_books(), max(settings.counts))
    backend = LlamaCppBackend(
        model, n_ctx=settings.n_ctx, threads=threads, adapter_budget_bytes=settings.budget_bytes
    )
    try:
        with tempfile.TemporaryDirectory(prefix="a3x-bench-adapters-") as folder:
            return _run(backend, Path(folder), threads, settings, routes)
    finally:
        backend.close()


def _run(
    backend: LlamaCppBackend,
    folder: Path,
    threads: int,
    settings: BenchSettings,
    routes: SyntheticRoutes | None,
) -> AdapterBenchmark:
    # Adapters: a registry of rank-`rank` adapters, at least 3 for the throughput
    # sides, and one large adapter.
    registered = max(*settings.counts, 3)
    paths = register_adapters(folder / "adapters", backend.info, registered, settings.rank)
    large = write_synthetic_adapter(
        folder / "large.gguf", backend.info, settings.large_rank, seed=10_000
    )
    # Up to 300 MB were just written, and their writeback would overlap the timed
    # loads. Runs without this sync loaded rank-8 adapters from the page cache at
    # up to 20 ms p50 with 100 registered, against 1 to 3 ms otherwise.
    os.sync()

    # Latency of switching, loading, combining and routing, per registry size.
    populations = [
        measure_population(backend, paths[:count], settings.samples, settings.load_samples, routes)
        for count in settings.counts
    ]
    _unload_all(backend)
    load_warm = measure_load(backend, [large], settings.load_samples)
    load_cold = measure_load(backend, [large], settings.load_samples, cold=True)
    _unload_all(backend)
    load_parts = measure_load_parts(backend, large, settings.load_samples)

    # What a switch costs the next decode, then generation speed per adapter count.
    _unload_all(backend)
    prompts = benchmark_prompts(settings.prompts)
    plain, extra = measure_switch_decode(backend, (paths[0], paths[-1]), settings.decode_samples)
    sides = {0: [], 1: paths[:1], 3: paths[:3]}
    steps = measure_decode_step(backend, sides, settings.decode_samples)
    throughput = measure_throughput(backend, sides, prompts, settings.max_tokens, settings.rounds)

    return AdapterBenchmark(
        model=str(backend.model_path),
        machine=machine_description(),
        threads=threads,
        budget_bytes=settings.budget_bytes,
        rank=settings.rank,
        adapter_bytes=paths[0].stat().st_size,
        large_rank=settings.large_rank,
        large_adapter_bytes=large.stat().st_size,
        populations=populations,
        load_large_warm=load_warm,
        load_large_cold=load_cold,
        load_large_parts=load_parts,
        decode_plain=plain,
        decode_switch_extra=extra,
        decode_step=steps,
        throughput=throughput,
    )


# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="GGUF file (default: the bundled Gemma 3 270M)")
    parser.add_argument(
        "--threads", type=int, default=0, help="threads (default: one per available core)"
    )
    parser.add_argument(
        "--counts",
        type=_counts,
        default=DEFAULT_COUNTS,
        help="registry sizes to measure, comma-separated (default: 1,10,100)",
    )
    parser.add_argument(
        "--rank",
        type=int,
        default=DEFAULT_RANK,
        help="rank of the registered adapters (default 8: 2.9 MB on Gemma 3 270M)",
    )
    parser.add_argument(
        "--large-rank",
        type=int,
        default=DEFAULT_LARGE_RANK,
        help="rank of the large adapter for the load measurement (default 22: 8.1 MB on Gemma 3 "
        "270M)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=200,
        help="operations timed per activate, combine and route measurement (default 200)",
    )
    parser.add_argument(
        "--load-samples", type=int, default=50, help="loads timed per load measurement (default 50)"
    )
    parser.add_argument(
        "--prompts", type=int, default=8, help="prompts for the throughput runs (default 8)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=64, help="max tokens to generate per prompt (default 64)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="passes over the prompts (default 2)")
    parser.add_argument(
        "--budget-mib", type=float, default=256.0, help="adapter budget in MiB (default: 256)"
    )
    parser.add_argument(
        "--no-route",
        dest="route",
        action="store_false",
        help="leave out routing, which loads the MiniLM embedding model",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def command(args: argparse.Namespace) -> int:
    from daemon.config import ModelConfig, thread_count
    from runtime.default_model import default_model_path

    model = args.model or default_model_path()
    threads = thread_count(ModelConfig(threads=args.threads))
    settings = BenchSettings(
        counts=args.counts,
        rank=args.rank,
        large_rank=args.large_rank,
        samples=args.samples,
        load_samples=args.load_samples,
        prompts=args.prompts,
        max_tokens=args.max_tokens,
        rounds=args.rounds,
        budget_bytes=int(args.budget_mib * 2**20),
        route=args.route,
    )
    if settings.route:
        from bench.routing import shipped_books

        profiles = len(routing_texts(shipped_books())[1])
        if max(settings.counts) > profiles:
            print(
                f"a3x: error: --counts asks for {max(settings.counts)} registered adapters, but "
                f"routing has only {profiles} profiles, one per training text of the shipped "
                f"task books; give counts up to {profiles}, or pass --no-route",
                file=sys.stderr,
            )
            return 2
    result = run_benchmark(model, threads, settings)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print_report(result)
    return 0


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of whole numbers, such as 1,10,100"
        ) from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} has a count below 1; give counts of 1 or more")
    return counts


def print_report(result: AdapterBenchmark) -> None:
    print(f"model:    {result.model}")
    print(f"machine:  {result.machine}, {result.threads} threads")
    print(
        f"adapters: rank {result.rank} on q,k,v,o, {result.adapter_bytes / 1e6:.2f} MB each; "
        f"budget {result.budget_bytes / 2**20:.0f} MiB"
    )
    print()
    _print_populations(result.populations)
    size = result.large_adapter_bytes / 1e6
    for label, latency in (
        ("page cache", result.load_large_warm),
        ("disk", result.load_large_cold),
    ):
        print(
            f"load + activate {size:.1f} MB (rank {result.large_rank}) from {label}: "
            f"p50 {latency.p50:.3f} ms, p99 {latency.p99:.3f} ms"
        )
    parts = result.load_large_parts
    print(
        f"  parts from disk, p50/p99 ms: validate {parts.validate.p50:.3f}/{parts.validate.p99:.3f}"
        f", read file {parts.read.p50:.3f}/{parts.read.p99:.3f}"
        f", llama.cpp load {parts.init.p50:.3f}/{parts.init.p99:.3f}"
    )
    extra = result.decode_switch_extra
    print(
        f"decode of {SWITCH_PROMPT!r}: p50 {result.decode_plain.p50:.2f} ms; a switch before it "
        f"adds p50 {extra.p50:.2f} ms, p99 {extra.p99:.2f} ms "
        f"(CPU time: p50 {extra.cpu_p50:.2f} ms)"
    )
    print()
    for count, side in result.throughput.items():
        step = result.decode_step[count]
        print(
            f"{count} adapter(s) active: {side.tokens} tokens, {side.tokens_per_second:.1f} "
            f"tokens/s, ratio to base {result.ratio(count):.3f}; one step p50 {step.p50:.2f} ms, "
            f"ratio to base {result.step_ratio(count):.3f}, CPU time p50 {step.cpu_p50:.2f} ms, "
            f"ratio {result.step_ratio(count, cpu=True):.3f}"
        )
    print()
    for name, value, target, met in result.verdicts():
        comparison = ">=" if name.startswith("tokens/s") else "<="  # ratios: higher is better
        status = "met" if met else "MISSED"
        print(f"{status:6} {name}: {value:.3f} (target {comparison} {target:g})")


def _print_populations(populations: list[PopulationResult]) -> None:
    print(
        "registered  resident  activate p50/p99 ms  load+activate p50/p99 ms  "
        "combine 3 p50/p99 ms  route+activate p50/p99 ms"
    )
    for population in populations:
        print(
            f"{population.registered:10}  {population.resident:8}  "
            f"{_pair(population.activate, 8)}  {_pair(population.load, 13)}   "
            f"{_pair(population.combine, 9)}  {_pair(population.route, 14)}"
        )
    for population in populations:
        if population.route is None:
            continue
        picked = ", ".join(
            f"{decisions} picked {count}"
            for count, decisions in population.routed_histogram().items()
        )
        line = f"routing with {population.registered} registered: {picked}"
        embed = population.route_embed
        if embed is not None:
            line += f"; embedding the prompt p50 {embed.p50:.3f} ms, p99 {embed.p99:.3f} ms"
        print(line)


def _pair(latency: Latency | None, width: int) -> str:
    """Format p50 / p99 in ms, or a dash for a measurement not made."""
    if latency is None:
        return f"{'-':>{width}}" + " " * 10
    return f"{latency.p50:{width}.3f} / {latency.p99:7.3f}"
