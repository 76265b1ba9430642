"""One retraining round for one domain, as a recipe: data, memory check, training
in a child process, export to GGUF, load probe, gate, record.

The daemon calls `run_round` from the cycle's retrain phase; the bench and the
proofs call it directly. Every round ends in one of four outcomes, each
recorded in the adapter registry and returned for the journal:

- accepted: the gate passed; the adapter serves the domain from the next cycle;
- rejected: the gate did not pass; the adapter stays under adapters/ marked so;
- failed: training, export or the load probe failed (the error is kept);
- refused: the predicted memory exceeds the budget, so nothing was started.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from evaluators.gate import (
    GateConfig,
    GateVerdict,
    PerplexityPair,
    contradiction_evidence,
    domain_evidence,
    measure_perplexity,
    other_evidence,
    verdict,
)
from knowledge.corpus import split_corpus
from lora import LoraError
from lora.child import TrainingFailed, run_training_child
from lora.dataset import TrainingSet
from lora.export import export_adapter
from lora.memory_plan import (
    MemoryBudgetError,
    check_budget,
    check_lean_budget,
    choose_lean_plan,
    gguf_weight_bytes,
    plan_memory,
    read_model_shape,
)
from lora.registry import Adapter, AdapterRegistry, AdapterStatus
from lora.trainer import TrainingSpec
from runtime.backend import ActiveAdapter, Backend, SamplingParams

log = structlog.get_logger(__name__)

PROBE_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class RoundSettings:
    """The retraining knobs of the config, in one record."""

    memory_budget_bytes: int = 4096 * 2**20
    engine: str = "lean"
    precision: str = "auto"
    module_fraction: float = 1.0
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    batch_size: int = 1
    accumulation: int = 4
    max_sequence: int = 256
    epochs: float = 2.0
    learning_rate: float | None = None
    threads: int = 2
    seed: int = 0
    gate: GateConfig = field(default_factory=GateConfig)


@dataclass(frozen=True)
class DomainTask:
    """What the gate needs of a task: its id, prompt and greedy answer settings."""

    task_id: str
    prompt: str
    sampling: SamplingParams


@dataclass
class RoundResult:
    domain: str
    reason: str  # why the round ran
    outcome: str  # accepted, rejected, failed, refused
    message: str
    cycle: int
    adapter: str = ""  # domain/vN, empty when refused
    incumbent: str = ""  # the adapter it was compared with; empty: the base model
    dataset: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)  # predicted and measured peak
    training: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RoundInputs:
    domain: str
    reason: str
    cycle: int
    training_set: TrainingSet
    domain_tasks: tuple[DomainTask, ...]
    other_held_out: dict[str, tuple[str, ...]]  # other domain -> held-out paragraphs
    base_gguf: Path
    base_folder: Path  # Hugging Face folder the trainer loads
    poison: str = ""  # negative controls for the proofs: "", "shuffle"


def run_round(
    inputs: RoundInputs,
    settings: RoundSettings,
    registry: AdapterRegistry,
    backend: Backend,
    stop: threading.Event | None = None,
) -> RoundResult:
    started = time.perf_counter()
    result = RoundResult(inputs.domain, inputs.reason, "failed", "", inputs.cycle)
    result.dataset = inputs.training_set.summary()
    try:
        _run(inputs, settings, registry, backend, stop, result)
    finally:
        result.seconds = round(time.perf_counter() - started, 1)
    log.info(
        "retrain.finished",
        domain=inputs.domain,
        outcome=result.outcome,
        adapter=result.adapter,
        seconds=result.seconds,
    )
    return result


def _run(
    inputs: RoundInputs,
    settings: RoundSettings,
    registry: AdapterRegistry,
    backend: Backend,
    stop: threading.Event | None,
    result: RoundResult,
) -> None:
    # Memory: predict the peak and refuse before anything starts
    try:
        checkpointing = _plan_memory(inputs, settings, result)
    except MemoryBudgetError as error:
        result.outcome, result.message = "refused", str(error)
        return
    if not inputs.training_set.train:
        result.outcome = "refused"
        result.message = "no training examples: no usable answers and no corpus training text"
        return

    # Training, in a child process
    adapter = registry.create(
        inputs.domain,
        {"reason": inputs.reason, "cycle": inputs.cycle, "dataset": result.dataset},
    )
    result.adapter = adapter.name
    spec = replace(_spec(inputs, settings, adapter), checkpointing=checkpointing)
    log.info(
        "retrain.training", domain=inputs.domain, adapter=adapter.name, examples=len(spec.examples)
    )
    try:
        trained = run_training_child(spec, settings.memory_budget_bytes, stop)
    except TrainingFailed as error:
        result.memory["measured_peak_bytes"] = error.peak_rss_bytes
        _fail(registry, adapter, result, str(error))
        return
    result.memory["measured_peak_bytes"] = trained.peak_rss_bytes
    result.training = {k: v for k, v in asdict(trained).items() if k != "output"}

    # Export to GGUF and load it once in a child process
    try:
        export_adapter(
            adapter.peft_folder,
            adapter.gguf_path,
            base=inputs.base_gguf,
            metadata_overrides={
                "domain": inputs.domain,
                "training_data_sha256": inputs.training_set.sha256,
            },
        )
        probe_adapter(inputs.base_gguf, adapter.gguf_path)
    except LoraError as error:
        _fail(registry, adapter, result, f"export failed: {error}")
        return

    # Gate: candidate against the incumbent
    incumbent = registry.serving(inputs.domain)
    result.incumbent = incumbent.name if incumbent else ""
    gate = evaluate_candidate(backend, inputs, adapter, incumbent, settings.gate)
    result.gate = gate.to_json()
    result.message = gate.reason
    status = AdapterStatus.ACCEPTED if gate.accepted else AdapterStatus.REJECTED
    result.outcome = str(status)
    target = next(row for row in gate.evidence if row.role == "domain")
    export_adapter(
        adapter.peft_folder,
        adapter.gguf_path,
        base=inputs.base_gguf,
        metadata_overrides={
            "domain": inputs.domain,
            "training_data_sha256": inputs.training_set.sha256,
            "validation": {
                "held_out_perplexity": target.candidate,
                "incumbent_held_out_perplexity": target.incumbent,
            },
        },
    )
    adapter = registry.set_status(
        adapter,
        status,
        gate=result.gate,
        training=result.training,
        memory=result.memory,
        incumbent=result.incumbent,
    )
    if status is AdapterStatus.ACCEPTED:
        write_routing_profile(adapter, inputs.training_set)


def write_routing_profile(adapter: Adapter, training_set: TrainingSet) -> None:
    """Store the accepted adapter's routing profile from its training texts. A failure
    costs only the profile: the router builds it from the task book on first use."""
    from knowledge.embed import EmbedderError, routing_embedder
    from lora.router import SOURCE_TRAINING_SET, build_profile, training_groups

    try:
        build_profile(
            adapter, training_groups(training_set.train), routing_embedder(), SOURCE_TRAINING_SET
        )
    except (LoraError, EmbedderError, OSError) as error:
        log.error("retrain.profile_failed", adapter=adapter.name, error=str(error))


def _plan_memory(inputs: RoundInputs, settings: RoundSettings, result: RoundResult) -> bool:
    """Predict the round's peak memory, record it, and refuse over the budget; return
    whether the lean engine should checkpoint."""
    shape = read_model_shape(inputs.base_folder)
    batch, sequence = settings.batch_size, settings.max_sequence
    if settings.engine == "lean":
        from lora.lean import compute_dtype

        dtype_bytes = compute_dtype(settings.precision).itemsize
        weights = gguf_weight_bytes(inputs.base_gguf, shape, dtype_bytes)
        lean = choose_lean_plan(
            shape, weights, settings.rank, settings.targets, batch, sequence, dtype_bytes
        )
        result.memory = {"predicted": lean.to_json(), "budget_bytes": settings.memory_budget_bytes}
        check_lean_budget(lean, settings.memory_budget_bytes, batch, sequence)
        return lean.checkpointing
    plan = plan_memory(shape, settings.rank, settings.targets, batch, sequence)
    result.memory = {"predicted": plan.to_json(), "budget_bytes": settings.memory_budget_bytes}
    check_budget(plan, settings.memory_budget_bytes, batch, sequence)
    return False


def _spec(inputs: RoundInputs, settings: RoundSettings, adapter: Adapter) -> TrainingSpec:
    return TrainingSpec(
        base_folder=str(inputs.base_folder),
        base_gguf=str(inputs.base_gguf),
        examples=[
            {"prompt": example.prompt, "completion": example.completion}
            for example in inputs.training_set.train
        ],
        output=str(adapter.peft_folder),
        rank=settings.rank,
        alpha=settings.alpha,
        targets=settings.targets,
        batch_size=settings.batch_size,
        accumulation=settings.accumulation,
        max_sequence=settings.max_sequence,
        epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        threads=settings.threads,
        seed=settings.seed,
        poison=inputs.poison,
        engine=settings.engine,
        precision=settings.precision,
        module_fraction=settings.module_fraction,
    )


def _fail(registry: AdapterRegistry, adapter: Adapter, result: RoundResult, message: str) -> None:
    log.error("retrain.failed", domain=adapter.domain, adapter=adapter.name, error=message)
    result.outcome, result.message = "failed", message
    registry.set_status(adapter, AdapterStatus.FAILED, error=message, memory=result.memory)


def probe_adapter(base: Path, adapter: Path) -> None:
    """Load the adapter on the base in a child process; llama.cpp aborts on some bad files."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "runtime.probe", str(base), str(adapter)],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired as error:
        raise LoraError(f"loading adapter {adapter} took over {PROBE_TIMEOUT_SECONDS} s") from error
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LoraError(
            f"llama.cpp could not load adapter {adapter} (exit {done.returncode}: {detail})"
        )


def evaluate_candidate(
    backend: Backend,
    inputs: RoundInputs,
    candidate: Adapter,
    incumbent: Adapter | None,
    config: GateConfig,
) -> GateVerdict:
    """Measure incumbent and candidate on held-out text and the domain's tasks, and judge."""
    serving = [ActiveAdapter(incumbent.gguf_path, 1.0)] if incumbent else []
    trying = [ActiveAdapter(candidate.gguf_path, 1.0)]
    evidence = []
    try:
        texts = inputs.training_set.held_out_texts
        if texts:
            evidence.append(
                domain_evidence(inputs.domain, _pair(backend, texts, serving, trying), config)
            )
        for other, paragraphs in sorted(inputs.other_held_out.items()):
            if paragraphs:
                evidence.append(
                    other_evidence(other, _pair(backend, paragraphs, [], trying), config)
                )
        before = _answers(backend, inputs.domain_tasks, serving)
        after = _answers(backend, inputs.domain_tasks, trying)
        evidence.append(contradiction_evidence(inputs.domain, before, after, config))
    finally:
        backend.set_adapters([])
    answers = [(task_id, old, new) for (task_id, old), (_, new) in zip(before, after, strict=True)]
    return verdict(evidence, answers)


def _pair(
    backend: Backend,
    texts: Sequence[str],
    incumbent: list[ActiveAdapter],
    candidate: list[ActiveAdapter],
) -> PerplexityPair:
    backend.set_adapters(incumbent)
    before, tokens = measure_perplexity(backend.log_likelihood, texts)
    backend.set_adapters(candidate)
    after, _ = measure_perplexity(backend.log_likelihood, texts)
    return PerplexityPair(tuple(before), tuple(after), tuple(tokens))


def _answers(
    backend: Backend, tasks: Sequence[DomainTask], adapters: list[ActiveAdapter]
) -> list[tuple[str, str]]:
    backend.set_adapters(adapters)
    answers = []
    for task in tasks:
        params = replace(task.sampling, temperature=0.0, seed=0)
        answers.append((task.task_id, backend.generate(task.prompt, params).text.strip()))
    return answers


def held_out_of_domains(domains: dict[str, Any], skip: str) -> dict[str, tuple[str, ...]]:
    """Return the held-out corpus paragraphs of every domain but `skip`."""
    found = {}
    for name, domain in domains.items():
        if name != skip and domain.reference_corpus is not None:
            found[name] = split_corpus(domain.reference_corpus).held_out
    return found
