"""Export and import on the tiny Llama model: names, q/k row order, scales, refusals,
the round trip, and agreement of llama.cpp+GGUF with transformers+PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lora.export import ExportError, export_adapter
from lora.gguf_adapter import read_gguf_adapter
from lora.importer import import_adapter
from lora.info import describe_adapter
from lora.metadata import MetadataError
from lora.peft_adapter import PeftAdapterError, read_peft_adapter
from runtime.backend import ActiveAdapter
from runtime.llama_cpp_backend import LlamaCppBackend
from runtime.transformers_backend import TransformersBackend
from tests.lora.peft_factory import make_peft_adapter

TEXT = "the capital of france is paris and the river is long"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def llama(tiny_gguf: Path):
    backend = LlamaCppBackend(tiny_gguf, n_ctx=512, threads=1)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def reference(tiny_gguf: Path, cache_dir: Path):
    backend = TransformersBackend(tiny_gguf, cache_dir=cache_dir, threads=1)
    yield backend
    backend.close()


def log_likelihoods(llama, reference, peft: Path, gguf_file: Path, scale: float = 1.0):
    llama.set_adapters([ActiveAdapter(gguf_file, scale)])
    reference.set_adapters([ActiveAdapter(peft, scale)])
    try:
        return llama.log_likelihood(TEXT).total, reference.log_likelihood(TEXT).total
    finally:
        llama.set_adapters([])
        reference.set_adapters([])


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": ALL_LINEAR},
        {"target_modules": ["q_proj", "k_proj", "v_proj"], "use_rslora": True, "r": 8},
        {
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"v_proj": 2, "model.layers.1.mlp.down_proj": 6},
            "alpha_pattern": {"q_proj": 3.0},
        },
    ],
    ids=["all-linear", "rslora", "rank-alpha-pattern"],
)
def test_exported_adapter_matches_peft(tiny_gguf, cache_dir, tmp_path, llama, reference, config):
    peft = make_peft_adapter(tiny_gguf, cache_dir, tmp_path / "peft", **config)
    exported = export_adapter(peft, tmp_path / "adapter.gguf")

    base = llama.log_likelihood(TEXT).total
    measured, expected = log_likelihoods(llama, reference, peft, exported.output, scale=0.8)

    assert abs(expected - base) > 0.05  # the adapter changes the model
    assert measured == pytest.approx(expected, rel=1e-4)


def test_rslora_scale_is_folded(tiny_gguf, cache_dir, tmp_path):
    peft = make_peft_adapter(
        tiny_gguf, cache_dir, tmp_path / "peft", use_rslora=True, r=4, lora_alpha=8
    )
    result = export_adapter(peft, tmp_path / "adapter.gguf")

    assert result.metadata.scale_folded
    # PEFT scales by 8 / sqrt(4) = 4, llama.cpp by 8 / 4 = 2, so lora_b carries x2.
    factors = [target.fold_factor for target in result.targets]
    assert factors == pytest.approx([2.0] * len(factors))


def test_plain_adapter_is_not_folded(tiny_gguf, cache_dir, tmp_path):
    peft = make_peft_adapter(tiny_gguf, cache_dir, tmp_path / "peft")
    result = export_adapter(peft, tmp_path / "adapter.gguf")
    adapter = read_gguf_adapter(result.output)
    original = read_peft_adapter(peft)

    assert not result.metadata.scale_folded
    module = "model.layers.0.self_attn.v_proj"
    np.testing.assert_array_equal(
        adapter.pairs["blk.0.attn_v.weight"].b, original.factors[module][1]
    )


def test_round_trip_gives_identical_tensors(tiny_gguf, cache_dir, tmp_path):
    peft = make_peft_adapter(
        tiny_gguf,
        cache_dir,
        tmp_path / "peft",
        target_modules=["q_proj", "k_proj", "o_proj"],
        rank_pattern={"k_proj": 2},
    )
    first = export_adapter(peft, tmp_path / "first.gguf", outtype="f16")
    imported = import_adapter(first.output, tmp_path / "imported", base=tiny_gguf)
    second = export_adapter(imported.folder, tmp_path / "second.gguf", outtype="f16")

    one, two = read_gguf_adapter(first.output), read_gguf_adapter(second.output)
    assert sorted(one.pairs) == sorted(two.pairs)
    for target, pair in one.pairs.items():
        np.testing.assert_array_equal(pair.a, two.pairs[target].a, err_msg=target)
        np.testing.assert_array_equal(pair.b, two.pairs[target].b, err_msg=target)
    assert one.alpha == two.alpha


def test_imported_adapter_matches_gguf(tiny_gguf, cache_dir, tmp_path, llama, reference):
    peft = make_peft_adapter(tiny_gguf, cache_dir, tmp_path / "peft", target_modules=ALL_LINEAR)
    exported = export_adapter(peft, tmp_path / "adapter.gguf")
    imported = import_adapter(exported.output, tmp_path / "imported", base=tiny_gguf)

    measured, expected = log_likelihoods(llama, reference, imported.folder, exported.output)

    assert measured == pytest.approx(expected, rel=1e-4)


def test_import_of_llama_qk_needs_base(tiny_gguf, cache_dir, tmp_path):
    peft = make_peft_adapter(tiny_gguf, cache_dir, tmp_path / "peft", target_modules=["q_proj"])
    exported = export_adapter(peft, tmp_path / "adapter.gguf")

    with pytest.raises(Exception, match="pass the base GGUF with --base"):
        import_adapter(exported.output, tmp_path / "imported")


def test_missing_base_path_needs_explicit_base(tiny_gguf, cache_dir, tmp_path):
    peft = make_peft_adapter(tiny_gguf, cache_dir, tmp_path / "peft")
    config_path = peft / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "/home/someone-else/models/gemma-3-270m"
    config_path.write_text(json.dumps(config))

    with pytest.raises(ExportError, match="pass the base GGUF file with --base"):
        export_adapter(peft, tmp_path / "adapter.gguf")
    result = export_adapter(peft, tmp_path / "adapter.gguf", base=tiny_gguf)
    assert result.output.exists()


def test_base_without_target_is_refused(tiny_gguf, cache_dir, tmp_path):
    peft = make_peft_adapter(tiny_gguf, cache_dir, tmp_path / "peft")
    weights = peft / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    renamed = {key.replace("layers.1.", "layers.7."): value for key, value in tensors.items()}
    save_file(renamed, str(weights))

    with pytest.raises(ExportError, match="model.layers.7.self_attn.v_proj"):
        export_adapter(peft, tmp_path / "adapter.gguf")


def test_shape_mismatch_is_refused(tiny_gguf, cache_dir, tmp_path):
    from bench.tiny_model import TinyConfig, write_tiny_gguf

    wider = write_tiny_gguf(tmp_path / "wider.gguf", TinyConfig(embedding_length=128))
    peft = make_peft_adapter(tiny_gguf, cache_dir, tmp_path / "peft")

    with pytest.raises(ExportError, match="another base"):
        export_adapter(peft, tmp_path / "adapter.gguf", base=wider)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["embed_tokens", "v_proj"]}, "embedding"),
        ({"bias": "lora_only"}, "bias"),
    ],
    ids=["dora", "lm-head-saved", "embedding", "bias"],
)
def test_unconvertible_adapters_are_refused(tiny_gguf, cache_dir, tmp_path, config, message):
    peft = make_peft_adapter(tiny_gguf, cache_dir, tmp_path / "peft", **config)

    with pytest.raises(PeftAdapterError, match=message):
        export_adapter(peft, tmp_path / "adapter.gguf")
    assert not (tmp_path / "adapter.gguf").exists()


def test_metadata_is_written_to_both_formats(tiny_gguf, cache_dir, tmp_path):
    peft = make_peft_adapter(tiny_gguf, cache_dir, tmp_path / "peft", r=4)
    exported = export_adapter(peft, tmp_path / "adapter.gguf", metadata_overrides={"domain": "geo"})
    imported = import_adapter(exported.output, tmp_path / "imported", base=tiny_gguf)

    gguf_summary = describe_adapter(exported.output)
    peft_summary = describe_adapter(imported.folder)

    assert gguf_summary.metadata is not None
    assert peft_summary.metadata == gguf_summary.metadata
    assert gguf_summary.metadata.domain == "geo"
    assert gguf_summary.metadata.base.architecture == "llama"
    assert gguf_summary.metadata.rank == 4
    assert gguf_summary.metadata.targets == ("v_proj",)


def test_newer_metadata_version_is_refused(tiny_gguf, cache_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    peft = make_peft_adapter(tiny_gguf, cache_dir, tmp_path / "peft")
    exported = export_adapter(peft, tmp_path / "adapter.gguf")
    imported = import_adapter(exported.output, tmp_path / "imported", base=tiny_gguf)
    weights = imported.folder / "adapter_model.safetensors"
    header = read_peft_adapter(imported.folder).header
    save_file(load_file(str(weights)), str(weights), metadata={**header, "a3x.format_version": "2"})

    with pytest.raises(MetadataError, match="format 2.*upgrade A3X"):
        describe_adapter(imported.folder)


def test_export_leaves_no_partial_file(tiny_gguf, cache_dir, tmp_path, monkeypatch):
    import gguf

    peft = make_peft_adapter(tiny_gguf, cache_dir, tmp_path / "peft")

    def full_disk(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(ExportError, match="No space left"):
        export_adapter(peft, tmp_path / "adapter.gguf")
    assert list(tmp_path.glob("*adapter.gguf*")) == []
