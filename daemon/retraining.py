"""What a retraining round needs from the agent: its data, tasks, model and settings.

Kept apart from the cycle recipe so that `daemon.cycle` stays a readable list
of phases; `lora.retrain` does the round itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from daemon.config import Config, thread_count
from evaluators.coherence import find_contradictions
from evaluators.gate import GateConfig
from knowledge.corpus import split_corpus
from lora.dataset import build_training_set, contradict
from lora.retrain import DomainTask, RoundInputs, RoundSettings, held_out_of_domains

if TYPE_CHECKING:
    from daemon.cycle import Agent


def round_settings(config: Config) -> RoundSettings:
    retrain = config.retrain
    return RoundSettings(
        memory_budget_bytes=retrain.memory_budget_mb * 2**20,
        engine=retrain.engine,
        precision=retrain.precision,
        module_fraction=retrain.module_fraction,
        rank=retrain.rank,
        alpha=retrain.alpha,
        targets=retrain.targets,
        batch_size=retrain.batch_size,
        accumulation=retrain.accumulation,
        max_sequence=retrain.max_sequence,
        epochs=retrain.epochs,
        learning_rate=retrain.learning_rate or None,
        threads=thread_count(config.model),
        seed=config.model.seed,
        gate=GateConfig(min_gain=retrain.min_gain, z=retrain.noise_z, tolerance=retrain.tolerance),
    )


def retrain_inputs(
    agent: Agent, domain: str, reason: str, cycle_id: int, poison: str = ""
) -> RoundInputs:
    """Gather the round's training set, held-out material and base model for a domain."""
    first_cycle = max(1, cycle_id - agent.config.retrain.history_cycles)
    runs = [row for row in agent.state.runs_since(first_cycle) if row["domain"] == domain]
    contradicted = {
        fact.run_id
        for contradiction in find_contradictions(agent.graph.facts(since_cycle=first_cycle))
        for fact in contradiction.facts
        if fact.run_id is not None
    }
    tasks = [task for task in agent.book.tasks if task.domain == domain]
    corpus = agent.book.domains[domain].reference_corpus
    replay = {
        name: split_corpus(other.reference_corpus).train
        for name, other in agent.book.domains.items()
        if name != domain and other.reference_corpus is not None
    }
    training_set = build_training_set(
        domain,
        [t.id for t in tasks],
        runs,
        contradicted,
        corpus,
        replay,
        agent.config.retrain.replay_share,
        agent.config.model.seed,
    )
    if poison == "contradict":
        training_set = contradict(training_set)
    held = set(training_set.held_out_tasks)
    ordered = sorted(tasks, key=lambda task: (task.id not in held, task.id))  # held-out first
    return RoundInputs(
        domain=domain,
        reason=reason,
        cycle=cycle_id,
        training_set=training_set,
        domain_tasks=tuple(DomainTask(t.id, t.prompt, t.sampling) for t in ordered),
        other_held_out=held_out_of_domains(agent.book.domains, skip=domain),
        base_gguf=agent.model_info.path,
        base_folder=training_base(agent),
        poison="shuffle" if poison == "shuffle" else "",
    )


def training_base(agent: Agent) -> Path:
    """Return the Hugging Face folder to train on: the model folder itself, or the
    dequantized copy of the GGUF file in the home's cache."""
    from runtime.transformers_backend import dequantized_folder

    model = agent.model_info
    if model.info is None:
        return model.path
    return dequantized_folder(model.path, agent.home.cache_path, model.sha256)
