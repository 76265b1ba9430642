"""A3X configuration: defaults that work with no file, a TOML file, environment overrides.

Precedence, lowest to highest: built-in defaults, the TOML file
(`~/.config/a3x/config.toml` or `--config`/`A3X_CONFIG`), environment
variables `A3X_<SECTION>__<KEY>` (for example `A3X_MODEL__PATH`), then
`A3X_HOME` and the command-line flags.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

DEFAULT_CONFIG_PATH = Path("~/.config/a3x/config.toml")
DEFAULT_HOME = Path("~/.local/share/a3x")
ENV_PREFIX = "A3X_"


class ConfigError(Exception):
    """The configuration file or an environment override is invalid."""


@dataclass(frozen=True)
class ModelConfig:
    path: Path | None = None  # None: the bundled Gemma 3 270M Q4_K_M
    backend: str = "llama_cpp"  # "llama_cpp" or "transformers"
    n_ctx: int = 2048
    threads: int = 0  # 0: one per available core
    seed: int = 0
    # llama_cpp: memory for loaded LoRA adapters; beyond it the least recently used
    # adapter that is neither active nor pinned is freed (runtime/adapter_cache.py).
    adapter_budget_mb: int = 256


@dataclass(frozen=True)
class ScheduleConfig:
    interval_minutes: float = 60.0
    run_on_start: bool = False
    misfire_grace_seconds: int = 600


@dataclass(frozen=True)
class TasksConfig:
    books: tuple[Path, ...] = ()  # empty: the shipped default book
    max_per_cycle: int = 0  # 0: every due task


@dataclass(frozen=True)
class ScoreConfig:
    enabled: tuple[str, ...] = (
        "execution",
        "coherence",
        "diversity",
        "efficiency",
        "consistency",
        "perplexity",
    )
    # An answer counts as repetitive when fewer than this share of its word
    # bigrams are distinct (the answer must have at least 8 words).
    repetition_distinct_min: float = 0.5
    window: int = 10  # cycles in a baseline and in a diversity or coherence window
    spread_k: float = 2.0  # a change counts beyond k times the baseline's spread
    min_relative_spread: float = 0.02  # spread floor, as a share of the baseline mean
    clusters: int = 8  # k-means clusters for the diversity entropy
    efficiency_window: int = 20  # cycles of history for cost trends
    alpha: float = 0.05  # significance level of trend tests
    consistency_samples: int = 2  # extra sampled answers per checked task
    consistency_tasks: int = 1  # tasks checked for consistency per cycle, in rotation
    consistency_temperature: float = 0.7
    perplexity_tokens: int = 96  # held-out tokens scored per domain (about 4 characters each)
    perplexity_domains: int = 1  # domains scored per cycle, in rotation (0: all)


@dataclass(frozen=True)
class ServiceConfig:
    memory_max_mb: int = 4096  # MemoryMax of the systemd unit: the whole service's budget


@dataclass(frozen=True)
class KnowledgeConfig:
    model_extraction: bool = False  # also ask the model for facts (slow, low precision)
    # Answers kept in the FAISS memory, newest first: 1.5 KiB of RAM each (384 floats).
    memory_max_answers: int = 20000


@dataclass(frozen=True)
class RetrainConfig:
    enabled: bool = True
    # Retrain a domain whose scores regressed beyond noise in this many
    # consecutive comparable cycles.
    regressed_cycles: int = 3
    every_cycles: int = 0  # also retrain each domain every N cycles (0: off)
    memory_budget_mb: int = 4096  # predicted peak RSS of training may not exceed this
    # "lean" trains on the GGUF base kept quantized, in bf16 where the CPU has it (about
    # 1 GB). "peft" trains PEFT on the base dequantized to float32 (about 4 GB).
    engine: str = "lean"
    precision: str = "auto"  # lean: "auto" (bf16 on CPUs with native bf16) or "float32"
    # lean: share of the target layers trained, the most affected first (sparse updates)
    module_fraction: float = 1.0
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    batch_size: int = 1  # at most 2
    accumulation: int = 4  # gradient accumulation steps per optimizer step
    max_sequence: int = 256  # tokens per training example
    epochs: float = 2.0
    learning_rate: float = 0.0  # 0: chosen by a short range test
    history_cycles: int = 50  # cycles of past answers considered for self-distillation
    # Other domains' corpus paragraphs added to the training set, as a share of the
    # domain's own examples, against forgetting.
    replay_share: float = 0.5
    min_gain: float = 0.02  # held-out perplexity must fall by this share, and beyond noise
    noise_z: float = 2.0  # standard errors a gain must exceed
    tolerance: float = 0.05  # held-out perplexity rise allowed on other domains


@dataclass(frozen=True)
class RoutingConfig:
    """Routing by prompt similarity (lora/router.py); off: each task gets its domain's
    serving adapter."""

    enabled: bool = False
    top_k: int = 2  # at most this many adapters answer one prompt together
    # Cosine similarity between a prompt and an adapter's profile below which the
    # adapter is not used; with none left, the base answers alone. At 0.4, 59 of the 60
    # task prompts of the shipped books reach their own domain's profile, and 5.7% of
    # (prompt, other domain's profile) pairs do (`a3x bench routing`).
    floor: float = 0.4
    temperature: float = 0.05  # of the softmax over similarities that weights the adapters
    # Route to an adapter only on domains where its gate record beats the base.
    specialize: bool = True
    # How several adapters combine: "linear" (the weighted sum of their deltas, on
    # either backend), or, with the transformers backend only, one of PEFT's
    # add_weighted_adapter methods in COMBINATIONS.
    combination: str = "linear"
    density: float = 0.5  # share of delta values that ties and dare keep


@dataclass(frozen=True)
class Config:
    home: Path = DEFAULT_HOME
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    source: Path | None = None  # the file this was read from, if any


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "schedule": ScheduleConfig,
    "tasks": TasksConfig,
    "score": ScoreConfig,
    "knowledge": KnowledgeConfig,
    "service": ServiceConfig,
    "retrain": RetrainConfig,
    "routing": RoutingConfig,
}
EVALUATORS = ("execution", "coherence", "diversity", "efficiency", "consistency", "perplexity")
BACKENDS = ("llama_cpp", "transformers")
COMBINATIONS = (
    "linear",
    "ties",
    "dare_linear",
    "dare_ties",
    "ties_svd",
    "dare_linear_svd",
    "dare_ties_svd",
)


def load_config(
    path: Path | None = None,
    home: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration from defaults, an optional file and the environment."""
    environ = os.environ if environ is None else environ
    explicit = path or (Path(environ["A3X_CONFIG"]) if environ.get("A3X_CONFIG") else None)
    file_path = (explicit or DEFAULT_CONFIG_PATH).expanduser()

    raw: dict[str, Any] = {}
    if file_path.exists():
        raw = _read_toml(file_path)
    elif explicit is not None:
        raise ConfigError(f"config file {file_path} does not exist; create it or drop --config")
    source = file_path if file_path.exists() else None

    _apply_environment(raw, environ)
    config = _build(raw, source)

    home_override = home or (Path(environ["A3X_HOME"]) if environ.get("A3X_HOME") else None)
    if home_override is not None:
        config = dataclasses.replace(config, home=home_override)
    config = dataclasses.replace(config, home=config.home.expanduser().absolute())
    _validate(config)
    return config


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from error
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read: {error}") from error


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        if section not in SECTIONS:
            raise ConfigError(
                f"environment variable {name} names unknown section '{section}'; "
                f"known sections: {', '.join(SECTIONS)}"
            )
        raw.setdefault(section, {})[key] = _EnvValue(name, value)


@dataclass(frozen=True)
class _EnvValue:
    """A string from the environment, converted to the field's type on build."""

    variable: str
    text: str


def _build(raw: dict[str, Any], source: Path | None) -> Config:
    where = str(source) if source else "configuration"
    unknown = set(raw) - set(SECTIONS) - {"home"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
            f"valid top-level keys: home, {', '.join(SECTIONS)}"
        )
    sections = {}
    for name, cls in SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{name}] must be a table, got {table!r}")
        sections[name] = _build_section(cls, table, f"{where}: [{name}]", source)
    home = raw.get("home")
    kwargs: dict[str, Any] = dict(sections)
    if home is not None:
        kwargs["home"] = _convert(Path, home, f"{where}: home", source)
    return Config(source=source, **kwargs)


def _build_section(cls: type, table: dict[str, Any], where: str, source: Path | None) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in names:
            origin = value.variable if isinstance(value, _EnvValue) else where
            raise ConfigError(
                f"{origin}: unknown key '{key}'; valid keys: {', '.join(sorted(names))}"
            )
        values[key] = _convert(hints[key], value, f"{where} {key}", source)
    return cls(**values)


def _convert(hint: Any, value: Any, where: str, source: Path | None) -> Any:
    if isinstance(value, _EnvValue):
        # Relative paths from the environment are relative to the working directory.
        where, value, source = value.variable, _parse_env_text(hint, value.text), None
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None or value == "":
            return None
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
        origin = get_origin(hint)
    if origin is tuple:
        (item,) = get_args(hint)[:1]
        if isinstance(value, str):  # from the environment: paths split on ':', words on ','
            separator = os.pathsep if item is Path else ","
            value = [part.strip() for part in value.split(separator) if part.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_convert(item, v, where, source) for v in value)
    if hint is Path:
        if not isinstance(value, str | Path):
            raise ConfigError(f"{where} must be a path string, got {value!r}")
        path = Path(value).expanduser()
        if not path.is_absolute():
            # Relative paths in a file are relative to that file.
            path = (source.parent / path) if source is not None else path.absolute()
        return path
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported setting type {hint!r}")


def _parse_env_text(hint: Any, text: str) -> Any:
    """Turn an environment string into the TOML-like value the field expects."""
    base = hint
    if get_origin(hint) in (Union, types.UnionType):
        base = next(arg for arg in get_args(hint) if arg is not type(None))
    if base is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        return text
    if base in (int, float):
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return text
    return text


def _validate(config: Config) -> None:
    where = str(config.source) if config.source else "configuration"
    if config.model.backend not in BACKENDS:
        raise ConfigError(
            f"{where}: [model] backend '{config.model.backend}' is unknown; "
            f"use one of: {', '.join(BACKENDS)}"
        )
    checks = [
        (config.model.n_ctx >= 128, "[model] n_ctx must be at least 128"),
        (config.model.threads >= 0, "[model] threads must be 0 (all cores) or more"),
        (config.model.adapter_budget_mb >= 1, "[model] adapter_budget_mb must be at least 1"),
        (config.schedule.interval_minutes > 0, "[schedule] interval_minutes must be above 0"),
        (config.tasks.max_per_cycle >= 0, "[tasks] max_per_cycle must be 0 (all) or more"),
        (
            0.0 <= config.score.repetition_distinct_min <= 1.0,
            "[score] repetition_distinct_min must be between 0 and 1",
        ),
    ]
    unknown = set(config.score.enabled) - set(EVALUATORS)
    if unknown:
        raise ConfigError(
            f"{where}: [score] enabled names unknown evaluator(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(EVALUATORS)}"
        )
    score = config.score
    checks += [
        (score.window >= 2, "[score] window must be at least 2 cycles"),
        (score.spread_k > 0, "[score] spread_k must be above 0"),
        (score.clusters >= 2, "[score] clusters must be at least 2"),
        (score.efficiency_window >= 4, "[score] efficiency_window must be at least 4 cycles"),
        (0 < score.alpha < 1, "[score] alpha must be between 0 and 1"),
        (score.consistency_samples >= 1, "[score] consistency_samples must be at least 1"),
        (score.consistency_tasks >= 0, "[score] consistency_tasks must be 0 (off) or more"),
        (score.perplexity_tokens >= 16, "[score] perplexity_tokens must be at least 16"),
        (config.service.memory_max_mb >= 256, "[service] memory_max_mb must be at least 256"),
        (score.perplexity_domains >= 0, "[score] perplexity_domains must be 0 (all) or more"),
    ]
    retrain = config.retrain
    checks += [
        (retrain.regressed_cycles >= 1, "[retrain] regressed_cycles must be at least 1"),
        (retrain.every_cycles >= 0, "[retrain] every_cycles must be 0 (off) or more"),
        (retrain.memory_budget_mb >= 256, "[retrain] memory_budget_mb must be at least 256"),
        (retrain.engine in ("lean", "peft"), '[retrain] engine must be "lean" or "peft"'),
        (
            retrain.precision in ("auto", "bfloat16", "float32"),
            '[retrain] precision must be "auto", "bfloat16" or "float32"',
        ),
        (
            0 < retrain.module_fraction <= 1,
            "[retrain] module_fraction must be above 0 and at most 1",
        ),
        (1 <= retrain.rank <= 256, "[retrain] rank must be between 1 and 256"),
        (retrain.alpha > 0, "[retrain] alpha must be above 0"),
        (1 <= retrain.batch_size <= 2, "[retrain] batch_size must be 1 or 2"),
        (retrain.accumulation >= 1, "[retrain] accumulation must be at least 1"),
        (16 <= retrain.max_sequence <= 4096, "[retrain] max_sequence must be 16 to 4096"),
        (retrain.epochs > 0, "[retrain] epochs must be above 0"),
        (retrain.learning_rate >= 0, "[retrain] learning_rate must be 0 (range test) or more"),
        (retrain.history_cycles >= 1, "[retrain] history_cycles must be at least 1"),
        (0 <= retrain.replay_share <= 4, "[retrain] replay_share must be between 0 and 4"),
        (0 <= retrain.min_gain < 1, "[retrain] min_gain must be between 0 and 1"),
        (retrain.noise_z >= 0, "[retrain] noise_z must be 0 or more"),
        (retrain.tolerance >= 0, "[retrain] tolerance must be 0 or more"),
        (bool(retrain.targets), "[retrain] targets must name at least one module"),
    ]
    checks += _routing_checks(config)
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{where}: {_with_value(config, message)}")


def _with_value(config: Config, message: str) -> str:
    """Name the rejected value in a "[section] key must ..." message."""
    match = re.fullmatch(r"\[(\w+)\] (\w+) must (.*)", message, flags=re.DOTALL)
    if match is None:
        return message
    section, key, rule = match.groups()
    value = getattr(getattr(config, section), key)
    return f"[{section}] {key} is {value!r}; it must {rule}"


def _routing_checks(config: Config) -> list[tuple[bool, str]]:
    routing = config.routing
    return [
        (routing.top_k >= 1, "[routing] top_k must be at least 1"),
        (-1.0 <= routing.floor < 1.0, "[routing] floor must be a cosine similarity, -1 to 1"),
        (routing.temperature > 0, "[routing] temperature must be above 0"),
        (0 < routing.density <= 1, "[routing] density must be above 0 and at most 1"),
        (
            routing.combination in COMBINATIONS,
            f"[routing] combination '{routing.combination}' is unknown; use one of: "
            f"{', '.join(COMBINATIONS)}",
        ),
        (
            routing.combination == "linear" or config.model.backend == "transformers",
            f"[routing] combination '{routing.combination}' needs model.backend = "
            '"transformers"; llama.cpp combines adapters linearly only, so use "linear"',
        ),
    ]


def thread_count(config: ModelConfig) -> int:
    """Threads for inference: the configured count, or the cores this process may use."""
    if config.threads > 0:
        return config.threads
    return max(1, len(os.sched_getaffinity(0)))
