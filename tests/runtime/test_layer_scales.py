"""Per-layer and per-module scales applied at run time (ActiveAdapter.layers) on the
tiny F32 model: llama.cpp through derived adapter files, transformers through PEFT's
per-module scaling, and the two against each other."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.adapters import write_synthetic_adapter
from lora.importer import import_adapter
from lora.layers import LayerScales
from runtime.backend import ActiveAdapter
from runtime.gguf_file import check_model_file
from runtime.llama_cpp_backend import AdapterError, LlamaCppBackend
from runtime.transformers_backend import AdapterLoadError

TEXTS = (
    "the capital of france is paris and the river is long",
    "two plus three is five, and five plus five is ten",
)
# As in test_composition.py: the backends differ by llama.cpp's F16 KV cache.
LOG_LIKELIHOOD_REL = 2e-4
HALF_FIRST_BLOCK = LayerScales.parse({"layers": {"0": 0.5}, "modules": {"attn_v": -1.0}})


@pytest.fixture(scope="module")
def adapter(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One rank-4 adapter on q, k, v and o of both blocks, as GGUF and as PEFT."""
    folder = tmp_path_factory.mktemp("layered")
    base = check_model_file(tiny_gguf)
    gguf = write_synthetic_adapter(folder / "qkvo.gguf", base, rank=4, seed=5, b_std=0.3)
    peft = import_adapter(gguf, folder / "qkvo-peft", base=tiny_gguf).folder
    return {"gguf": gguf, "peft": peft}


@pytest.fixture(scope="module")
def llama(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    derived = tmp_path_factory.mktemp("derived")
    backend = LlamaCppBackend(tiny_gguf, n_ctx=512, threads=1, derived_dir=derived)
    yield backend
    backend.close()


def likelihoods(backend, adapters: list[ActiveAdapter]) -> list[float]:
    backend.set_adapters(adapters)
    try:
        return [backend.log_likelihood(text).total for text in TEXTS]
    finally:
        backend.set_adapters([])


@pytest.mark.parametrize(
    "layers",
    [
        HALF_FIRST_BLOCK,
        LayerScales.parse({"default": 0.0, "layers": {"1": 1.5}}),
        LayerScales.parse({"modules": {"attn_q": 0.0, "attn_k": 0.0, "attn_output": 2.0}}),
    ],
    ids=["block-and-module", "one-block", "modules-only"],
)
def test_backends_agree_with_layer_scales(llama, torch_backend, adapter, layers):
    measured = likelihoods(llama, [ActiveAdapter(adapter["gguf"], 0.8, layers=layers)])
    reference = likelihoods(torch_backend, [ActiveAdapter(adapter["peft"], 0.8, layers=layers)])
    plain = likelihoods(torch_backend, [ActiveAdapter(adapter["peft"], 0.8)])
    for got, want, without in zip(measured, reference, plain, strict=True):
        assert got == pytest.approx(want, rel=LOG_LIKELIHOOD_REL)
        assert want != pytest.approx(without, rel=1e-3)  # the scales changed something


def test_unit_scales_equal_the_plain_adapter(llama, torch_backend, adapter):
    ones = LayerScales.parse({"default": 1.0, "modules": {"attn_v": 1}})
    assert ones.is_identity
    assert not HALF_FIRST_BLOCK.is_identity
    # llama.cpp loads the source file itself: no derived copy for scales of 1.
    assert llama._file_of(ActiveAdapter(adapter["gguf"], 1.0, layers=ones)) == adapter["gguf"]
    for backend, path in ((llama, adapter["gguf"]), (torch_backend, adapter["peft"])):
        plain = likelihoods(backend, [ActiveAdapter(path, 0.7)])
        layered = likelihoods(backend, [ActiveAdapter(path, 0.7, layers=ones)])
        assert layered == pytest.approx(plain, rel=1e-6)


def test_layered_and_plain_together_agree(llama, torch_backend, adapter):
    """The same adapter twice, once whole and once with layer scales, as a routed
    pair would apply it: both backends sum the two."""
    pair = [(0.5, None), (-0.3, HALF_FIRST_BLOCK)]
    measured = likelihoods(
        llama, [ActiveAdapter(adapter["gguf"], s, layers=layers) for s, layers in pair]
    )
    reference = likelihoods(
        torch_backend, [ActiveAdapter(adapter["peft"], s, layers=layers) for s, layers in pair]
    )
    assert measured == pytest.approx(reference, rel=LOG_LIKELIHOOD_REL)


def test_derived_file_made_once(llama, adapter, monkeypatch):
    import lora.layers

    calls = []
    derive = lora.layers.derive_adapter
    monkeypatch.setattr(
        lora.layers, "derive_adapter", lambda *args, **kw: calls.append(args) or derive(*args, **kw)
    )
    layers = LayerScales.parse({"layers": {"1": 0.25}})
    for _ in range(2):
        llama.set_adapters([ActiveAdapter(adapter["gguf"], 1.0, layers=layers)])
        llama.set_adapters([])
        for entry in llama.adapter_cache.entries():
            llama.adapter_cache.evict(entry.path)  # the second round loads the file again
    assert len(calls) == 1
    derived = [p for p in llama.derived_dir.glob("*.gguf") if p.name != adapter["gguf"].name]
    assert derived  # under derived_dir, named by content hash


def test_unknown_module_rejected_by_both(llama, torch_backend, adapter):
    layers = LayerScales.parse({"modules": {"ffn_up": 0.5}})
    with pytest.raises(AdapterError, match="module 'ffn_up' in the layer scales is not"):
        llama.set_adapters([ActiveAdapter(adapter["gguf"], 1.0, layers=layers)])
    with pytest.raises(AdapterLoadError, match="module 'ffn_up' in the layer scales is not"):
        torch_backend.set_adapters([ActiveAdapter(adapter["peft"], 1.0, layers=layers)])
    torch_backend.set_adapters([])


def test_out_of_range_block_rejected(llama, torch_backend, adapter):
    layers = LayerScales.parse({"layers": {"2-5": 0.5}})
    with pytest.raises(AdapterError, match="the model has blocks 0-1"):
        llama.set_adapters([ActiveAdapter(adapter["gguf"], 1.0, layers=layers)])
    with pytest.raises(AdapterLoadError, match="the model has blocks 0-1"):
        torch_backend.set_adapters([ActiveAdapter(adapter["peft"], 1.0, layers=layers)])
    torch_backend.set_adapters([])


def test_layer_scales_need_linear_in_transformers(torch_backend, adapter):
    pair = [
        ActiveAdapter(adapter["peft"], 0.5, layers=HALF_FIRST_BLOCK),
        ActiveAdapter(adapter["peft"], 0.5),
    ]
    with pytest.raises(AdapterLoadError, match="need the linear combination, not ties"):
        torch_backend.set_adapters(pair, combination="ties")


def test_scales_round_trip_through_json():
    spec = {"default": 0.5, "layers": {"0-3": 2.0, "7": 0.0}, "modules": {"attn_v": -1.0}}
    scales = LayerScales.parse(spec)
    assert LayerScales.parse(scales.to_json()) == scales
    assert scales.to_json() == spec
