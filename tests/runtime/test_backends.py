"""Both backends on the tiny model: generation, log-likelihood and adapters, and
the reference check that llama.cpp and transformers agree on the same GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.backend import ActiveAdapter, Backend, SamplingParams
from runtime.llama_cpp_backend import AdapterError
from runtime.transformers_backend import AdapterLoadError, TransformersBackend
from tests.runtime.lora_fixtures import lora_weights, write_gguf_adapter, write_peft_adapter

TEXT = "the capital of france is paris and the river is long"
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, repeat_penalty=1.0)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("adapters")
    one, two = lora_weights(seed=1), lora_weights(seed=2)
    return {
        "gguf": [
            write_gguf_adapter(folder / "one.gguf", one),
            write_gguf_adapter(folder / "two.gguf", two),
        ],
        "peft": [write_peft_adapter(folder / "one", one), write_peft_adapter(folder / "two", two)],
    }


def test_backends_implement_protocol(llama, torch_backend):
    assert isinstance(llama, Backend)
    assert isinstance(torch_backend, Backend)


def test_llama_greedy_generation_repeats(llama):
    first = llama.generate("the capital of france is", GREEDY)
    second = llama.generate("the capital of france is", GREEDY)
    assert first.text == second.text
    assert first.text.strip()
    assert first.completion_tokens == 12
    assert first.finish_reason == "length"
    assert first.prompt_tokens > 5


def test_llama_stop_string_cuts_answer(llama):
    full = llama.generate("the capital of france is", GREEDY).text
    stop = full.strip()[:2]
    cut = llama.generate(
        "the capital of france is",
        SamplingParams(temperature=0.0, max_tokens=12, repeat_penalty=1.0, stop=(stop,)),
    )
    assert stop not in cut.text
    assert cut.finish_reason == "stop"


def test_log_likelihood_agrees_across_backends(llama, torch_backend):
    # Same GGUF weights in F32: llama.cpp and torch must agree closely.
    reference = torch_backend.log_likelihood(TEXT)
    measured = llama.log_likelihood(TEXT)
    assert measured.tokens == reference.tokens
    assert measured.total == pytest.approx(reference.total, rel=1e-4)


def test_log_likelihood_prefers_seen_order(llama):
    assert llama.log_likelihood(TEXT).perplexity > 1.0
    short = llama.log_likelihood("paris")
    assert short.tokens >= 1


def test_log_likelihood_leaves_generation_unchanged(llama):
    before = llama.generate("two plus three is", GREEDY).text
    llama.log_likelihood(TEXT)
    assert llama.generate("two plus three is", GREEDY).text == before


def test_llama_rejects_text_longer_than_context(llama):
    with pytest.raises(ValueError, match="more than the context of 512"):
        llama.log_likelihood("paris " * 600)


def test_adapter_changes_and_restores_llama(llama, adapters):
    base = llama.log_likelihood(TEXT).total
    llama.set_adapters([ActiveAdapter(adapters["gguf"][0], 1.0)])
    adapted = llama.log_likelihood(TEXT).total
    llama.set_adapters([])
    restored = llama.log_likelihood(TEXT).total
    assert adapted != pytest.approx(base, abs=1e-3)
    assert restored == pytest.approx(base, abs=1e-9)


def test_adapter_scale_zero_is_base(llama, adapters):
    base = llama.log_likelihood(TEXT).total
    llama.set_adapters([ActiveAdapter(adapters["gguf"][0], 0.0)])
    try:
        assert llama.log_likelihood(TEXT).total == pytest.approx(base, abs=1e-6)
    finally:
        llama.set_adapters([])


@pytest.mark.parametrize("scales", [(1.0,), (0.5, -0.7)])
def test_adapters_agree_across_backends(llama, torch_backend, adapters, scales):
    chosen = range(len(scales))
    llama.set_adapters(
        [ActiveAdapter(adapters["gguf"][i], s) for i, s in zip(chosen, scales, strict=True)]
    )
    torch_backend.set_adapters(
        [ActiveAdapter(adapters["peft"][i], s) for i, s in zip(chosen, scales, strict=True)]
    )
    try:
        measured = llama.log_likelihood(TEXT).total
        reference = torch_backend.log_likelihood(TEXT).total
    finally:
        llama.set_adapters([])
        torch_backend.set_adapters([])
    assert measured == pytest.approx(reference, rel=1e-4)


def test_transformers_adapters_cleared(torch_backend, adapters):
    base = torch_backend.log_likelihood(TEXT).total
    torch_backend.set_adapters([ActiveAdapter(adapters["peft"][0], 1.0)])
    adapted = torch_backend.log_likelihood(TEXT).total
    torch_backend.set_adapters([])
    assert adapted != pytest.approx(base, abs=1e-3)
    assert torch_backend.log_likelihood(TEXT).total == pytest.approx(base, abs=1e-9)


def test_llama_rejects_model_file_as_adapter(llama, tiny_gguf):
    with pytest.raises(AdapterError, match="is a GGUF model, not a LoRA adapter"):
        llama.set_adapters([ActiveAdapter(tiny_gguf)])


def test_llama_rejects_adapter_for_other_architecture(llama, adapters, tmp_path):
    other = write_gguf_adapter(tmp_path / "gemma.gguf", lora_weights(seed=3), "gemma3")
    with pytest.raises(AdapterError, match="architecture 'gemma3' but the base .* is 'llama'"):
        llama.set_adapters([ActiveAdapter(other)])


def test_transformers_rejects_gguf_adapter(torch_backend, adapters):
    with pytest.raises(AdapterLoadError, match="not a PEFT adapter folder"):
        torch_backend.set_adapters([ActiveAdapter(adapters["gguf"][0])])


def test_transformers_stop_string(torch_backend):
    full = torch_backend.generate("the capital of france is", GREEDY).text
    assert full
    stop = full[len(full) // 2]
    cut = torch_backend.generate(
        "the capital of france is",
        SamplingParams(temperature=0.0, max_tokens=12, repeat_penalty=1.0, stop=(stop,)),
    )
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop"


def test_dequantized_cache_reused(tiny_gguf: Path, tmp_path: Path, monkeypatch):
    first = TransformersBackend(tiny_gguf, cache_dir=tmp_path, threads=1)
    expected = first.log_likelihood(TEXT).total
    first.close()

    # A second load must come from the cache folder, never from the GGUF file again.
    import transformers

    original = transformers.AutoModelForCausalLM.from_pretrained

    def refuse_gguf(*args, **kwargs):
        assert "gguf_file" not in kwargs, "the GGUF file was converted a second time"
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse_gguf)
    second = TransformersBackend(tiny_gguf, cache_dir=tmp_path, threads=1)
    assert second.folder.parent == tmp_path / "dequantized"
    assert second.log_likelihood(TEXT).total == pytest.approx(expected, abs=1e-9)


def test_memory_reports_rss(llama):
    memory = llama.memory()
    assert memory.rss_bytes > 10 * 2**20
    assert memory.peak_rss_bytes >= memory.rss_bytes
    assert memory.model_file_bytes > 0


@pytest.mark.parametrize("active", [0, 1])
def test_transformers_prefetch_keeps_applied_adapters(tiny_gguf, adapters, tmp_path, active):
    """Prefetching loads PEFT adapters without applying them, even the first one, which
    PeftModel.from_pretrained would apply."""
    backend = TransformersBackend(tiny_gguf, cache_dir=tmp_path / "cache", threads=1)
    try:
        applied = [ActiveAdapter(adapters["peft"][1], 0.5)][:active]
        backend.set_adapters(applied)
        before = backend.log_likelihood(TEXT).total
        missing = tmp_path / "missing"
        loaded = backend.prefetch_adapters(
            [ActiveAdapter(adapters["peft"][0]), ActiveAdapter(missing)]
        )
        assert loaded == [adapters["peft"][0]]
        assert backend.log_likelihood(TEXT).total == pytest.approx(before, abs=1e-9)
        backend.set_adapters([ActiveAdapter(adapters["peft"][0], 1.0)])
        assert backend.log_likelihood(TEXT).total != pytest.approx(before, abs=1e-3)
    finally:
        backend.close()
