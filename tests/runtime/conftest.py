"""Backends on the tiny F32 model, one of each per test module."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.llama_cpp_backend import LlamaCppBackend
from runtime.transformers_backend import TransformersBackend


@pytest.fixture(scope="module")
def llama(tiny_gguf: Path):
    backend = LlamaCppBackend(tiny_gguf, n_ctx=512, threads=1)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def torch_backend(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    backend = TransformersBackend(tiny_gguf, cache_dir=tmp_path_factory.mktemp("cache"), threads=1)
    yield backend
    backend.close()
