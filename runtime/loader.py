"""Choosing the model file and opening the configured backend on it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from runtime.backend import Backend
from runtime.default_model import default_model_path, default_model_sha256
from runtime.gguf_file import GGUFInfo, ModelFileError, check_model_file, sha256_of_file

if TYPE_CHECKING:
    from daemon.config import Config, ModelConfig
    from daemon.home import Home

log = structlog.get_logger(__name__)

PROBE_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    sha256: str
    info: GGUFInfo | None  # None for a Hugging Face folder
    is_default: bool

    def to_json(self, backend: str) -> dict[str, Any]:
        return {
            "name": self.info.name if self.info else self.path.name,
            "path": str(self.path),
            "sha256": self.sha256,
            "architecture": self.info.architecture if self.info else None,
            "size_bytes": self.info.size_bytes if self.info else None,
            "backend": backend,
            "default": self.is_default,
        }


def describe_model(config: ModelConfig) -> ModelInfo:
    """Locate and validate the configured model without loading its weights."""
    if config.path is None:
        path = default_model_path()
        return ModelInfo(path, default_model_sha256(), check_model_file(path), True)
    path = config.path.expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelFileError(
                f"model folder {path} has no config.json; point model.path at a GGUF file or "
                "a Hugging Face model folder"
            )
        return ModelInfo(path, "", None, False)
    info = check_model_file(path)
    return ModelInfo(path, sha256_of_file(path), info, False)


def open_backend(config: Config, home: Home) -> Backend:
    """Open the backend named by `model.backend` on the configured model."""
    model = describe_model(config.model)
    opener = BACKENDS[config.model.backend]
    return opener(model, config, home)


def _open_llama_cpp(model: ModelInfo, config: Config, home: Home) -> Backend:
    from runtime.llama_cpp_backend import LlamaCppBackend

    if model.info is None:
        raise ModelFileError(
            f"{model.path} is a Hugging Face folder; the llama_cpp backend needs a GGUF file, "
            'so set model.backend = "transformers" or model.path to a .gguf file'
        )
    probe_once(model, home.cache_path)
    from daemon.config import thread_count

    return LlamaCppBackend(
        model.path,
        n_ctx=config.model.n_ctx,
        threads=thread_count(config.model),
        seed=config.model.seed,
        adapter_budget_bytes=config.model.adapter_budget_mb * 2**20,
        derived_dir=home.cache_path / "derived-adapters",
    )


def _open_transformers(model: ModelInfo, config: Config, home: Home) -> Backend:
    from daemon.config import thread_count
    from runtime.transformers_backend import TransformersBackend

    return TransformersBackend(
        model.path,
        cache_dir=home.cache_path,
        sha256=model.sha256 or None,
        threads=thread_count(config.model),
        seed=config.model.seed,
        combination=config.routing.combination,
        density=config.routing.density,
    )


BACKENDS: dict[str, Callable[[ModelInfo, Config, Home], Backend]] = {
    "llama_cpp": _open_llama_cpp,
    "transformers": _open_transformers,
}


def probe_once(model: ModelInfo, cache_dir: Path) -> None:
    """Load a GGUF file in a child process the first time this home opens it.

    llama.cpp aborts the process on some malformed files; the child takes that
    abort, and the parent turns it into a ModelFileError. A file that loaded
    once is remembered by its sha256.
    """
    marker = cache_dir / "verified" / f"{model.sha256}.json"
    if marker.exists():
        return
    log.info("model.probing", path=str(model.path))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "runtime.probe", str(model.path)],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired as error:
        raise ModelFileError(
            f"loading {model.path} in a test process took over {PROBE_TIMEOUT_SECONDS} s; "
            "the file may be damaged"
        ) from error
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        how = (
            f"signal {-result.returncode}"
            if result.returncode < 0
            else f"exit code {result.returncode}"
        )
        raise ModelFileError(
            f"llama.cpp failed to load {model.path} in a test process ({how}: {detail}); "
            "the file is damaged or not a model llama.cpp supports"
        )
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"path": str(model.path), "sha256": model.sha256}))
