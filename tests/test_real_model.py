"""The real default model (Gemma 3 270M Q4_K_M) where behaviour depends on it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import git
import pytest

from daemon.config import Config, ModelConfig
from daemon.cycle import Agent
from daemon.records import Outcome
from runtime.backend import SamplingParams
from runtime.default_model import default_model_path, default_model_sha256
from runtime.gguf_file import check_model_file

pytestmark = pytest.mark.slow

SENTENCE = "The capital of France is Paris. It is a large city in Europe."


@pytest.fixture(scope="module")
def gemma() -> Path:
    return default_model_path()


def test_default_model_assembled(gemma: Path):
    info = check_model_file(gemma)
    assert info.architecture == "gemma3"
    assert info.block_count == 18
    assert len(default_model_sha256()) == 64


def test_cycle_on_default_model(tmp_path: Path):
    agent = Agent(Config(home=tmp_path / "home", model=ModelConfig(threads=2)))
    record = agent.run_cycle()
    agent.close()

    assert record.outcome is Outcome.OK
    assert len(record.runs) >= 30
    assert all(run.text.strip() for run in record.runs)
    assert {run.language for run in record.runs} == {"en", "pt-BR"}
    capital = next(run for run in record.runs if run.task_id == "geo-capital-france-en")
    assert "Paris" in capital.text
    trailers = (
        git.Repo(tmp_path / "home" / "journal")
        .git.log("--format=%(trailers:key=A3X-Outcome,valueonly)")
        .split()
    )
    assert trailers == ["ok"]
    fsck = subprocess.run(["git", "fsck", "--strict"], cwd=tmp_path / "home" / "journal")
    assert fsck.returncode == 0


def test_backends_agree_on_default_model(gemma: Path, tmp_path: Path, monkeypatch):
    from runtime.llama_cpp_backend import LlamaCppBackend
    from runtime.transformers_backend import TransformersBackend

    llama = LlamaCppBackend(gemma, n_ctx=512, threads=2)
    quantized = llama.log_likelihood(SENTENCE)
    answer = llama.generate(
        "Q: What is the capital of France?\nA:",
        SamplingParams(temperature=0.0, max_tokens=16, stop=("\n",)),
    )
    llama.close()
    assert "Paris" in answer.text

    first = TransformersBackend(gemma, cache_dir=tmp_path, sha256=default_model_sha256(), threads=2)
    dequantized = first.log_likelihood(SENTENCE)
    first.close()
    # llama.cpp computes with Q4_K weights and quantized activations, torch with the
    # dequantized weights in fp32: the same tokens, log-likelihoods within 2%.
    assert dequantized.tokens == quantized.tokens
    assert dequantized.total == pytest.approx(quantized.total, rel=0.02)

    import transformers

    original = transformers.AutoModelForCausalLM.from_pretrained

    def refuse_gguf(*args, **kwargs):
        assert "gguf_file" not in kwargs, "the GGUF file was converted a second time"
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse_gguf)
    second = TransformersBackend(
        gemma, cache_dir=tmp_path, sha256=default_model_sha256(), threads=2
    )
    assert second.log_likelihood(SENTENCE).total == pytest.approx(dequantized.total, abs=1e-6)
    generation = second.generate(
        "Q: What is the capital of France?\nA:",
        SamplingParams(temperature=0.0, max_tokens=16, stop=("\n",)),
    )
    assert "Paris" in generation.text
    second.close()
