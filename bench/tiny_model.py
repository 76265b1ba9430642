"""A tiny Llama-architecture GGUF model built from a config, for fast tests and soaks.

The weights are random (seeded) and the vocabulary is a small SentencePiece-style
word list with byte fallback, so any text tokenizes. llama.cpp and transformers
both load the file. The output rows of the special and byte tokens are zero,
so greedy decoding never picks end-of-text and answers are never empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

WORDS = (
    "the a an is of in on and to capital city river country paris rome lisbon brazil "
    "france italy portugal water boils at degrees one two three four five six seven "
    "eight nine ten plus minus answer question summary code function returns list "
    "number sum text short long north south east west sea mountain big small"
).split()
PIECES = tuple("abcdefghijklmnopqrstuvwxyz0123456789.,?!:")


@dataclass(frozen=True)
class TinyConfig:
    embedding_length: int = 64
    block_count: int = 2
    head_count: int = 4
    head_count_kv: int = 2
    feed_forward_length: int = 128
    context_length: int = 512
    seed: int = 0
    tensor_type: str = "F32"  # "F32", "F16" or "Q8_0" for the 2-D weights


def tiny_vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types: <unk>, <s>, </s>, 256 byte tokens, then pieces."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    candidates = ["\u2581", *(f"\u2581{word}" for word in WORDS), *PIECES]
    candidates += [f"\u2581{char}" for char in PIECES]
    pieces = list(dict.fromkeys(candidates))  # llama.cpp aborts on duplicate tokens
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    # SentencePiece prefers higher scores; longer pieces score higher so words win.
    scores = [0.0] * (3 + 256) + [float(len(piece)) for piece in pieces]
    return tokens, scores, [int(t) for t in types]


def write_tiny_gguf(path: Path, config: TinyConfig | None = None) -> Path:
    """Write a tiny random Llama model to `path` and return the path."""
    import gguf

    config = config or TinyConfig()
    rng = np.random.default_rng(config.seed)
    tokens, scores, types = tiny_vocabulary()
    vocab = len(tokens)
    dim = config.embedding_length
    head_dim = dim // config.head_count
    kv_dim = head_dim * config.head_count_kv

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("a3x-tiny-llama")
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(dim)
    writer.add_block_count(config.block_count)
    writer.add_feed_forward_length(config.feed_forward_length)
    writer.add_head_count(config.head_count)
    writer.add_head_count_kv(config.head_count_kv)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.2).astype(np.float32)

    def add(name: str, array: np.ndarray) -> None:
        if array.ndim == 2 and config.tensor_type != "F32":
            kind = gguf.GGMLQuantizationType[config.tensor_type]
            if kind == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(name, array.astype(np.float16))
                return
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
            return
        writer.add_tensor(name, array)

    embedding = weight(vocab, dim)
    add("token_embd.weight", embedding)
    for block in range(config.block_count):
        prefix = f"blk.{block}"
        add(f"{prefix}.attn_norm.weight", np.ones(dim, dtype=np.float32))
        add(f"{prefix}.attn_q.weight", weight(dim, dim))
        add(f"{prefix}.attn_k.weight", weight(kv_dim, dim))
        add(f"{prefix}.attn_v.weight", weight(kv_dim, dim))
        add(f"{prefix}.attn_output.weight", weight(dim, dim))
        add(f"{prefix}.ffn_norm.weight", np.ones(dim, dtype=np.float32))
        add(f"{prefix}.ffn_gate.weight", weight(config.feed_forward_length, dim))
        add(f"{prefix}.ffn_up.weight", weight(config.feed_forward_length, dim))
        add(f"{prefix}.ffn_down.weight", weight(dim, config.feed_forward_length))
    add("output_norm.weight", np.ones(dim, dtype=np.float32))
    output = weight(vocab, dim)
    # Special and byte tokens get logit 0, below the max of the ~140 word and
    # letter logits, so greedy decoding emits readable pieces and never ends early.
    output[: 3 + 256] = 0.0
    add("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
