"""Tests of lora.quantized: bit-identity with gguf-py, QuantLinear's autograd, row lookups."""

from __future__ import annotations

import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from lora import LoraError, names
from lora.quantized import (
    SUPPORTED_TYPES,
    QuantEmbedding,
    QuantizedWeight,
    QuantizedWeightError,
    QuantLinear,
    UnsupportedQuantTypeError,
    dequantize,
)
from runtime.default_model import default_model_path
from runtime.gguf_file import TensorInfo, inspect_gguf

SEED = 0

# Types that gguf.quants.quantize can produce; it has no quantizer for the K-quants.
QUANTIZABLE_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
BLOCK_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)

# Byte offsets of the float16 fields (d, dmin or m) in each block, as gguf.quants
# reads them. Random blocks get small finite values there, so every
# dequantized value is finite and comparable.
F16_FIELDS = {
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q8_0: (0,),
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}


def random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random packed bytes (rows, row_bytes) of a block type, with finite float16 fields."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    packed = rng.integers(0, 256, size=(rows, cols // block_size * type_size), dtype=np.uint8)
    blocks = packed.reshape(-1, type_size)
    for start in F16_FIELDS[qtype]:
        scales = (rng.standard_normal((blocks.shape[0], 1)) * 0.01).astype(np.float16)
        blocks[:, start : start + 2] = scales.view(np.uint8)
    return packed


def random_weight(qtype: Q, rows: int, cols: int, seed: int = SEED) -> QuantizedWeight:
    rng = np.random.default_rng(seed)
    if qtype in QUANTIZABLE_TYPES:
        values = rng.standard_normal((rows, cols)).astype(np.float32)
        packed = gguf.quants.quantize(values, qtype).view(np.uint8).reshape(rows, -1)
    else:
        packed = random_blocks(qtype, rows, cols, rng)
    return QuantizedWeight(torch.from_numpy(packed.copy()), qtype, (rows, cols))


def assert_same_bits(actual: torch.Tensor, expected: np.ndarray) -> None:
    assert actual.dtype == torch.float32
    assert tuple(actual.shape) == expected.shape
    assert np.array_equal(actual.numpy().view(np.uint32), expected.view(np.uint32))


# Bit-identity with gguf.quants.dequantize


@pytest.mark.parametrize("qtype", QUANTIZABLE_TYPES, ids=lambda t: t.name)
def test_dequantize_quantized_data_matches_gguf(qtype: Q):
    rng = np.random.default_rng(SEED)
    rows, cols = 6, 512
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    packed = gguf.quants.quantize(values, qtype).view(np.uint8).reshape(rows, -1)

    expected = gguf.quants.dequantize(packed, qtype).reshape(rows, cols)
    assert_same_bits(dequantize(torch.from_numpy(packed), qtype, (rows, cols)), expected)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks_matches_gguf(qtype: Q):
    rows, cols = 5, 768
    packed = random_blocks(qtype, rows, cols, np.random.default_rng(SEED))

    expected = gguf.quants.dequantize(packed, qtype).reshape(rows, cols)
    assert_same_bits(dequantize(torch.from_numpy(packed), qtype, (rows, cols)), expected)


def test_every_supported_type_is_compared():
    assert set(QUANTIZABLE_TYPES) | set(BLOCK_TYPES) == set(SUPPORTED_TYPES)


@pytest.mark.parametrize("qtype", (Q.F16, Q.BF16), ids=lambda t: t.name)
def test_float_types_every_bit_pattern(qtype: Q):
    packed = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)
    expected = gguf.quants.dequantize(packed, qtype).reshape(-1)
    actual = dequantize(torch.from_numpy(packed), qtype, (1 << 16,)).numpy()

    is_nan = np.isnan(expected)
    assert np.array_equal(np.isnan(actual), is_nan)
    # torch turns a signaling float16 NaN into a quiet one, so only NaN bits may differ.
    assert np.array_equal(actual[~is_nan].view(np.uint32), expected[~is_nan].view(np.uint32))


def test_dequantize_accepts_any_byte_layout():
    rows, cols = 4, 256
    packed = random_blocks(Q.Q4_K, rows, cols, np.random.default_rng(SEED))
    expected = gguf.quants.dequantize(packed, Q.Q4_K).reshape(rows, cols)

    flat = torch.from_numpy(packed.reshape(-1))
    assert_same_bits(dequantize(flat, Q.Q4_K, (rows, cols)), expected)
    # A view that starts at an odd byte, so no float16 field is 2-byte aligned.
    shifted = torch.zeros(flat.numel() + 1, dtype=torch.uint8)
    shifted[1:] = flat
    assert_same_bits(dequantize(shifted[1:], Q.Q4_K, (rows, cols)), expected)


def test_dequantize_f32_returns_a_copy():
    values = torch.arange(64, dtype=torch.float32)
    packed = values.view(torch.uint8)

    result = dequantize(packed, Q.F32, (2, 32))
    result.zero_()

    assert torch.equal(values, torch.arange(64, dtype=torch.float32))


def test_dequantize_rejects_wrong_byte_count():
    packed = random_blocks(Q.Q8_0, 4, 64, np.random.default_rng(SEED))

    with pytest.raises(QuantizedWeightError, match="torch order") as raised:
        dequantize(torch.from_numpy(packed), Q.Q8_0, (2, 64))

    assert "Q8_0 data of shape (2, 64) takes 136 bytes, but the packed tensor has 272" in str(
        raised.value
    )


def test_dequantize_rejects_row_not_whole_blocks():
    with pytest.raises(QuantizedWeightError, match="a row of 100 values cannot be stored as Q4_K"):
        dequantize(torch.zeros(144, dtype=torch.uint8), Q.Q4_K, (1, 100))


def test_unsupported_type_names_it_and_supported():
    with pytest.raises(UnsupportedQuantTypeError) as raised:
        dequantize(torch.zeros(18, dtype=torch.uint8), Q.IQ4_NL, (1, 32))

    message = str(raised.value)
    assert isinstance(raised.value, LoraError)
    assert "GGUF type IQ4_NL has no torch dequantizer" in message
    assert "supported types are F32, F16, BF16, Q4_0" in message
    assert "Q6_K" in message


def test_quantized_weight_rejects_unsupported_type():
    with pytest.raises(UnsupportedQuantTypeError, match="IQ2_XXS"):
        QuantizedWeight(torch.zeros(1, 66, dtype=torch.uint8), Q.IQ2_XXS, (1, 256))


# The default model's tensors


@pytest.fixture(scope="module")
def gemma_tensors() -> tuple[Path, dict[str, TensorInfo]]:
    """The default model's path and tensor table, from the header scan: GGUFReader
    takes about 10 s on this model's vocabulary."""
    path = default_model_path()
    info = inspect_gguf(path)
    return path, {tensor.name: tensor for tensor in info.tensors}


# Tensors of every type in the default model (Gemma 3 270M Q4_K_M).
GEMMA_SAMPLES = {
    Q.Q4_K: ("blk.0.attn_output.weight", "blk.17.attn_output.weight"),
    Q.Q5_0: ("blk.0.attn_q.weight", "blk.9.ffn_up.weight"),
    Q.Q6_K: ("blk.0.ffn_down.weight", "blk.17.ffn_down.weight"),
    Q.Q8_0: ("blk.0.attn_v.weight", "token_embd.weight"),
    Q.F32: ("blk.0.attn_norm.weight", "output_norm.weight"),
}


@pytest.mark.parametrize("qtype", list(GEMMA_SAMPLES), ids=lambda t: t.name)
def test_default_model_tensors_match_gguf(
    gemma_tensors: tuple[Path, dict[str, TensorInfo]], qtype: Q
):
    path, tensors = gemma_tensors
    for name in GEMMA_SAMPLES[qtype]:
        tensor = tensors[name]
        assert tensor.type_name == qtype.name
        cols = tensor.shape[0]  # GGUF lists the row length first
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        row_bytes = cols // block_size * type_size
        rows = tensor.n_bytes // row_bytes
        mapped = np.memmap(
            path, dtype=np.uint8, mode="r", offset=tensor.offset, shape=(rows, row_bytes)
        )
        # The first and last rows, and a few from the middle.
        for start in (0, rows // 2, max(rows - 3, 0)):
            packed = np.array(mapped[start : start + 3])
            expected = gguf.quants.dequantize(packed, qtype).reshape(packed.shape[0], cols)
            actual = dequantize(torch.from_numpy(packed), qtype, (packed.shape[0], cols))
            assert_same_bits(actual, expected)


@pytest.mark.slow
def test_default_model_reader_tensors():
    reader = gguf.GGUFReader(default_model_path())
    tensors = {tensor.name: tensor for tensor in reader.tensors}

    for qtype, samples in GEMMA_SAMPLES.items():
        if qtype == Q.F32:
            continue  # the model's F32 tensors are 1-D norms, not weights
        for name in samples:
            tensor = tensors[name]
            weight = QuantizedWeight.from_reader_tensor(tensor)
            assert weight.qtype == qtype
            assert weight.data.data_ptr() == tensor.data.ctypes.data
            expected = gguf.quants.dequantize(np.array(tensor.data[:4]), qtype)
            assert_same_bits(weight.dequantize(rows=slice(0, 4)), expected)


# QuantizedWeight


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, Q]]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (data, qtype) in tensors.items():
        raw_dtype = None if qtype in (Q.F32, Q.F16) else qtype
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_from_reader_tensor_views_the_file(tmp_path: Path):
    rng = np.random.default_rng(SEED)
    values = rng.standard_normal((8, 256)).astype(np.float32)
    stored = {
        "f32.weight": (values, Q.F32),
        "f16.weight": (values.astype(np.float16), Q.F16),
        "bf16.weight": (gguf.quants.quantize(values, Q.BF16), Q.BF16),
        "q8_0.weight": (gguf.quants.quantize(values, Q.Q8_0), Q.Q8_0),
        "q4_k.weight": (random_blocks(Q.Q4_K, 8, 256, rng), Q.Q4_K),
        "norm.weight": (values[0], Q.F32),
    }
    write_gguf(tmp_path / "small.gguf", stored)
    reader = gguf.GGUFReader(tmp_path / "small.gguf")

    for tensor in reader.tensors:
        if tensor.name == "norm.weight":
            with pytest.raises(QuantizedWeightError, match="only 2-D tensors"):
                QuantizedWeight.from_reader_tensor(tensor)
            continue
        weight = QuantizedWeight.from_reader_tensor(tensor)
        assert weight.shape == (8, 256)
        assert weight.qtype == tensor.tensor_type
        assert weight.data.data_ptr() == tensor.data.ctypes.data  # a view, not a copy
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(8, 256)
        assert_same_bits(weight.dequantize(), expected)


def test_from_reader_tensor_emits_no_warning(tmp_path: Path):
    values = np.ones((2, 32), dtype=np.float32)
    write_gguf(tmp_path / "small.gguf", {"w.weight": (values, Q.F32)})
    tensor = gguf.GGUFReader(tmp_path / "small.gguf").tensors[0]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QuantizedWeight.from_reader_tensor(tensor)


@pytest.mark.parametrize("qtype", (Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.F16), ids=lambda t: t.name)
def test_row_slice_equals_full_rows(qtype: Q):
    weight = random_weight(qtype, 12, 256)
    full = weight.dequantize()

    assert torch.equal(weight.dequantize(rows=slice(3, 9)), full[3:9])
    assert torch.equal(weight.dequantize(rows=slice(1, None, 4)), full[1::4])
    assert torch.equal(weight.dequantize(rows=slice(5, 5)), full[5:5])
    bf16 = weight.dequantize(torch.bfloat16, rows=slice(0, 4))
    assert torch.equal(bf16, full[0:4].to(torch.bfloat16))


@pytest.mark.parametrize("qtype", (Q.Q8_0, Q.Q5_0, Q.Q4_K), ids=lambda t: t.name)
def test_gather_equals_indexed_rows(qtype: Q):
    weight = random_weight(qtype, 20, 256)
    full = weight.dequantize()
    ids = torch.tensor([[3, 0, 19, 3], [7, 7, 1, 12]])

    gathered = weight.gather(ids)

    assert gathered.shape == (2, 4, 256)
    assert torch.equal(gathered, full[ids])
    assert torch.equal(weight.gather(ids, torch.bfloat16), full[ids].to(torch.bfloat16))


def test_gather_rejects_out_of_range_id():
    weight = random_weight(Q.Q8_0, 4, 32)

    with pytest.raises(IndexError):
        weight.gather(torch.tensor([4]))


def test_permute_rows_matches_names_unpermute():
    heads, rows, cols = 4, 32, 256
    weight = random_weight(Q.Q6_K, rows, cols)
    full = weight.dequantize()
    order = names.unpermute_rows(np.arange(rows), heads)

    permuted = weight.permute_rows(order)

    expected = names.unpermute_rows(full.numpy(), heads)
    assert torch.equal(permuted.dequantize(), torch.from_numpy(expected))
    assert torch.equal(weight.dequantize(), full)  # the original is unchanged


def test_permute_rows_rejects_non_permutation():
    weight = random_weight(Q.Q8_0, 4, 32)

    with pytest.raises(QuantizedWeightError, match="not a permutation of the 4 rows"):
        weight.permute_rows([0, 1, 1, 3])


def test_nbytes_counts_packed_bytes():
    assert random_weight(Q.Q4_K, 3, 512).nbytes == 3 * 2 * 144
    assert random_weight(Q.Q8_0, 3, 64).nbytes == 3 * 2 * 34
    assert random_weight(Q.F32, 3, 64).nbytes == 3 * 64 * 4


def test_quantized_weight_rejects_mismatched_data():
    with pytest.raises(QuantizedWeightError, match=r"must be uint8 of shape \(2, 144\)"):
        QuantizedWeight(torch.zeros(2, 140, dtype=torch.uint8), Q.Q4_K, (2, 256))


# QuantLinear


@pytest.fixture
def q4k_weight() -> QuantizedWeight:
    return random_weight(Q.Q4_K, 24, 512)


def input_batch(in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    return torch.randn(2, 3, in_features, generator=generator).to(dtype).requires_grad_()


def test_quant_linear_forward_matches_linear(q4k_weight: QuantizedWeight):
    layer = QuantLinear(q4k_weight)
    x = input_batch(512)

    out = layer(x)

    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, q4k_weight.dequantize()))


def test_quant_linear_input_gradient_matches_linear(q4k_weight: QuantizedWeight):
    layer = QuantLinear(q4k_weight)
    x = input_batch(512)
    reference_x = x.detach().clone().requires_grad_()
    upstream = torch.randn(2, 3, 24, generator=torch.Generator().manual_seed(SEED + 1))

    (layer(x) * upstream).sum().backward()
    (F.linear(reference_x, q4k_weight.dequantize()) * upstream).sum().backward()

    assert x.grad is not None
    torch.testing.assert_close(x.grad, reference_x.grad)


def test_quant_linear_gradcheck():
    layer = QuantLinear(random_weight(Q.Q8_0, 4, 32))
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(SEED)).requires_grad_()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Input #0 requires gradient and is not a double")
        # float32 finite differences: eps and tolerances suit values of about 1.
        assert torch.autograd.gradcheck(layer, (x,), eps=1e-2, atol=1e-3, rtol=1e-3)


def test_quant_linear_bfloat16_within_rounding(q4k_weight: QuantizedWeight):
    layer = QuantLinear(q4k_weight, compute_dtype=torch.bfloat16)
    x = input_batch(512)
    weight = q4k_weight.dequantize()

    out = layer(x)
    out.sum().backward()

    assert out.dtype == torch.bfloat16
    assert x.grad is not None and x.grad.dtype == torch.float32
    # bfloat16 keeps 8 significant bits, so rounding x and W each errs by up to 2**-9
    # relative, their products by about 2**-8, and the bfloat16 output by 2**-9 more.
    # Accumulation is in float32.
    reference = F.linear(x.detach(), weight)
    bound = 2**-8 * F.linear(x.detach().abs(), weight.abs()) + 2**-9 * reference.abs()
    assert ((out.float() - reference).abs() <= 1.1 * bound).all()
    grad_reference = torch.ones(2, 3, 24) @ weight
    grad_bound = 2**-8 * (torch.ones(2, 3, 24) @ weight.abs()) + 2**-9 * grad_reference.abs()
    assert ((x.grad - grad_reference).abs() <= 1.1 * grad_bound).all()


def test_quant_linear_bias_is_added(q4k_weight: QuantizedWeight):
    bias = torch.linspace(-1, 1, 24)
    layer = QuantLinear(q4k_weight, bias=bias)
    x = input_batch(512)

    torch.testing.assert_close(layer(x), F.linear(x, q4k_weight.dequantize(), bias))


def test_quant_linear_has_no_parameters(q4k_weight: QuantizedWeight):
    layer = QuantLinear(q4k_weight, bias=torch.zeros(24))
    x = input_batch(512)

    layer(x).sum().backward()

    assert list(layer.parameters()) == []
    assert layer.state_dict() == {}
    assert not q4k_weight.data.requires_grad
    assert x.grad is not None


def test_quant_linear_saves_no_weight(q4k_weight: QuantizedWeight):
    layer = QuantLinear(q4k_weight, bias=torch.zeros(24))
    x = input_batch(512)
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x)
    assert saved == []

    # The same hook records the weight that a plain linear layer saves.
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        F.linear(x, q4k_weight.dequantize())
    assert any(tensor.numel() == 24 * 512 for tensor in saved)


def test_quant_linear_under_checkpoint(q4k_weight: QuantizedWeight):
    layer = QuantLinear(q4k_weight)
    calls = []
    dequantize_once = q4k_weight.dequantize

    def counting_dequantize(*args, **kwargs):
        calls.append(1)
        return dequantize_once(*args, **kwargs)

    q4k_weight.dequantize = counting_dequantize  # type: ignore[method-assign]
    x = input_batch(512)
    reference_x = x.detach().clone().requires_grad_()

    out = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    out.square().sum().backward()
    layer(reference_x).square().sum().backward()

    torch.testing.assert_close(x.grad, reference_x.grad, rtol=0, atol=0)
    # Two per run, forward and backward: the checkpointed run saved no tensor, so it
    # has nothing to recompute.
    assert len(calls) == 4


def test_quant_linear_under_no_grad(q4k_weight: QuantizedWeight):
    layer = QuantLinear(q4k_weight)
    x = input_batch(512)

    with torch.no_grad():
        out = layer(x)

    assert not out.requires_grad
    torch.testing.assert_close(out, F.linear(x.detach(), q4k_weight.dequantize()))


def test_quant_linear_casts_input(q4k_weight: QuantizedWeight):
    layer = QuantLinear(q4k_weight)
    x = input_batch(512, torch.bfloat16)

    out = layer(x)
    out.sum().backward()

    assert out.dtype == torch.float32
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


def test_quant_linear_rejects_float16(q4k_weight: QuantizedWeight):
    layer = QuantLinear(q4k_weight)

    with pytest.raises(QuantizedWeightError, match="compute dtype torch.float16 is not supported"):
        layer.compute_dtype = torch.float16


def test_quant_linear_rejects_wrong_bias(q4k_weight: QuantizedWeight):
    with pytest.raises(QuantizedWeightError, match="does not match 24 output features"):
        QuantLinear(q4k_weight, bias=torch.zeros(512))


# QuantEmbedding


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_quant_embedding_matches_gemma3_embedding(dtype: torch.dtype):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    vocabulary, hidden = 50, 64
    weight = random_weight(Q.Q8_0, vocabulary, hidden)
    scale = hidden**0.5
    reference = Gemma3TextScaledWordEmbedding(vocabulary, hidden, 0, embed_scale=scale)
    with torch.no_grad():
        reference.weight.copy_(weight.dequantize())
    reference.to(dtype)
    ids = torch.tensor([[1, 49, 0, 7], [7, 7, 2, 30]])

    embedding = QuantEmbedding(weight, scale=scale, compute_dtype=dtype)

    out = embedding(ids)
    assert out.dtype == dtype
    assert torch.equal(out, reference(ids))


def test_quant_embedding_without_scale():
    weight = random_weight(Q.Q8_0, 10, 32)
    ids = torch.tensor([9, 0, 4])

    embedding = QuantEmbedding(weight)

    assert torch.equal(embedding(ids), weight.dequantize()[ids])
    assert list(embedding.parameters()) == []
