"""Export and import on the real default model (Gemma 3 270M Q4_K_M) and real llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lora.export import export_adapter
from lora.gguf_adapter import read_gguf_adapter
from lora.importer import import_adapter
from lora.peft_adapter import PeftAdapterError
from runtime.backend import ActiveAdapter
from runtime.default_model import default_model_path, default_model_sha256
from runtime.llama_cpp_backend import LlamaCppBackend
from runtime.transformers_backend import TransformersBackend
from tests.lora.peft_factory import make_peft_adapter

pytestmark = pytest.mark.slow

TEXT = "The capital of France is Paris. It is a large city in Europe."


@pytest.fixture(scope="module")
def gemma() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def rslora_peft(gemma, model_cache, tmp_path_factory) -> Path:
    return make_peft_adapter(
        gemma,
        model_cache,
        tmp_path_factory.mktemp("peft") / "rslora",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        r=8,
        lora_alpha=16,
        use_rslora=True,
    )


@pytest.fixture(scope="module")
def pattern_peft(gemma, model_cache, tmp_path_factory) -> Path:
    return make_peft_adapter(
        gemma,
        model_cache,
        tmp_path_factory.mktemp("peft") / "pattern",
        seed=1,
        target_modules=["q_proj", "v_proj", "gate_proj"],
        r=8,
        rank_pattern={"v_proj": 4, "model.layers.3.self_attn.q_proj": 16},
        alpha_pattern={"gate_proj": 4.0},
    )


@pytest.mark.parametrize("which", ["rslora_peft", "pattern_peft"])
def test_gguf_adapter_matches_peft_on_gemma(gemma, model_cache, tmp_path, request, which):
    peft = request.getfixturevalue(which)
    exported = export_adapter(peft, tmp_path / "adapter.gguf", base=gemma)

    llama = LlamaCppBackend(gemma, n_ctx=256, threads=2)
    base_llama = llama.log_likelihood(TEXT).total
    llama.set_adapters([ActiveAdapter(exported.output, 1.0)])
    adapted_llama = llama.log_likelihood(TEXT).total
    llama.close()

    torch_backend = TransformersBackend(gemma, model_cache, default_model_sha256(), threads=2)
    base_torch = torch_backend.log_likelihood(TEXT).total
    torch_backend.set_adapters([ActiveAdapter(peft, 1.0)])
    adapted_torch = torch_backend.log_likelihood(TEXT).total
    torch_backend.close()

    # llama.cpp computes with quantized weights and activations, torch with the
    # dequantized weights in fp32, so the adapter's effect on the log-likelihood
    # differs between them by noise: 3-19% in a run on this text. A scale error is
    # far larger (an unfolded rsLoRA scale is off by sqrt(8) = 2.8x, the gate_proj
    # alpha_pattern by 4x), so 25% separates right from wrong.
    effect_torch = adapted_torch - base_torch
    assert abs(effect_torch) > 2.0
    assert adapted_llama - base_llama == pytest.approx(effect_torch, rel=0.25)


def test_round_trip_on_gemma(gemma, pattern_peft, tmp_path):
    first = export_adapter(pattern_peft, tmp_path / "first.gguf", base=gemma)
    imported = import_adapter(first.output, tmp_path / "imported", base=gemma)
    second = export_adapter(imported.folder, tmp_path / "second.gguf", base=gemma)

    one, two = read_gguf_adapter(first.output), read_gguf_adapter(second.output)
    assert sorted(one.pairs) == sorted(two.pairs)
    assert one.pairs["blk.3.attn_q.weight"].rank == 16
    for target, pair in one.pairs.items():
        np.testing.assert_array_equal(pair.a, two.pairs[target].a, err_msg=target)
        np.testing.assert_array_equal(pair.b, two.pairs[target].b, err_msg=target)


@pytest.mark.parametrize(
    ("config", "message"),
    [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save")],
    ids=["dora", "lm-head"],
)
def test_gemma_refusals(gemma, model_cache, tmp_path, config, message):
    peft = make_peft_adapter(gemma, model_cache, tmp_path / "peft", **config)

    with pytest.raises(PeftAdapterError, match=message):
        export_adapter(peft, tmp_path / "adapter.gguf", base=gemma)


def test_gemma_config_without_base_needs_explicit_base(gemma, rslora_peft, tmp_path):
    import json
    import shutil

    from lora.export import ExportError

    peft = Path(shutil.copytree(rslora_peft, tmp_path / "moved"))
    config = json.loads((peft / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (peft / "adapter_config.json").write_text(json.dumps(config))

    with pytest.raises(ExportError, match="names no base model; pass the base GGUF file"):
        export_adapter(peft, tmp_path / "adapter.gguf")
    result = export_adapter(peft, tmp_path / "adapter.gguf", base=gemma)
    assert result.metadata.base.architecture == "gemma3"
