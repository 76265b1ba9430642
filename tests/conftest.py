"""Shared fixtures: a tiny GGUF model, a small task book and configs that use them."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from bench.tiny_model import TinyConfig, write_tiny_gguf
from daemon.config import Config, ModelConfig, ScheduleConfig, TasksConfig

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 0.5 MB random Llama model in F32; llama.cpp loads it in milliseconds."""
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf", TinyConfig(seed=0))


@pytest.fixture(autouse=True)
def fresh_logging():
    """Reset structlog after each test: a command-line test configures it to write to
    pytest's captured stderr, which is closed once that test ends."""
    yield
    import structlog

    structlog.reset_defaults()


@pytest.fixture(scope="session")
def model_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder for dequantized models, shared by every test: pytest's cache
    folder, kept across runs, because dequantizing the default model takes about a
    minute; a folder of this session when the cache plugin is off."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("a3x-model-cache"))
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture
def small_book() -> Path:
    return DATA / "small_book.toml"


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_gguf: Path, small_book: Path) -> Config:
    """A config whose home is a fresh temporary folder and whose model is the tiny GGUF."""
    return Config(
        home=tmp_path / "home",
        model=ModelConfig(path=tiny_gguf, n_ctx=512, threads=1, seed=0),
        schedule=ScheduleConfig(interval_minutes=60.0),
        tasks=TasksConfig(books=(small_book,)),
    )


def with_changes(config: Config, **sections: dict) -> Config:
    """Return a copy of `config` with fields of its sections replaced."""
    changes = {
        name: dataclasses.replace(getattr(config, name), **fields)
        for name, fields in sections.items()
    }
    return dataclasses.replace(config, **changes)


@pytest.fixture
def env(tmp_path: Path, tiny_gguf: Path, small_book: Path) -> dict[str, str]:
    config = tmp_path / "config.toml"
    config.write_text("")  # isolates the test from the user's ~/.config/a3x
    environ = {k: v for k, v in os.environ.items() if not k.startswith("A3X_")}
    environ.update(
        A3X_CONFIG=str(config),
        A3X_HOME=str(tmp_path / "home"),
        A3X_MODEL__PATH=str(tiny_gguf),
        A3X_MODEL__THREADS="1",
        A3X_MODEL__N_CTX="512",
        A3X_TASKS__BOOKS=str(small_book),
        # Command-line tests skip the evaluators that load the embedding model (8 s a process).
        A3X_SCORE__ENABLED="execution,coherence,efficiency,perplexity",
    )
    return environ
