"""`a3x lora check`: does a GGUF adapter fit a base, and does llama.cpp apply it as PEFT does?

The check runs in two stages.

1. Structure, in Python only: metadata types, LoRA factor pairs, shapes,
   ranks, alpha, finite values, and that every target exists in the base
   with the same shape. Every problem is listed. When there is one, the check
   stops there, because llama.cpp aborts the process (a failed GGML_ASSERT) on
   some malformed adapters, for example an `adapter.lora.alpha` that is not a
   float32.
2. Numerics, when the PEFT original is given: the same prompts go through
   transformers with the PEFT adapter and through llama.cpp with the GGUF
   adapter, and the next-token distributions at every prompt position are
   compared (top-1 agreement and KL divergence). The two backends disagree a
   little even without an adapter, because llama.cpp quantizes activations
   for quantized weights while transformers runs the dequantized weights in
   float32. So the same comparison also runs without adapters, and the pass
   threshold is derived from that base-versus-base figure.

The numerics catch an export error only when it moves the distributions by
more than the threshold: a missing target, a wrong row order or a doubled
scale on an adapter of visible effect, but not a 10% scaling error on an
adapter that barely changes the model. The report gives the adapter's own
effect so that a reader can judge.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from lora import LoraError
from lora.gguf_adapter import LORA_A, LORA_B, GGUFAdapter, LoraPair, structure_problems
from lora.names import block_of
from runtime.gguf_file import (
    GGUFInfo,
    ModelFileError,
    TensorInfo,
    check_model_file,
    inspect_gguf,
    read_tensor,
)

if TYPE_CHECKING:
    import torch

    from lora.peft_adapter import PeftAdapter
    from runtime.llama_cpp_backend import LlamaCppBackend
    from runtime.transformers_backend import TransformersBackend

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1  # of the --json report

# Completion-style prompts (the default model is a base model without a chat
# template) in the styles the agent's tasks use: facts, code, question and
# answer, Portuguese, reasoning. With Gemma 3's tokenizer they are 129
# positions in all, BOS tokens included.
BUILTIN_PROMPTS = (
    "The capital of France is Paris. It is known for the Eiffel Tower, which was built for",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n'
    "        return n\n    return",
    "Q: How many legs does a spider have?\nA: A spider has eight legs.\n"
    "Q: How many legs does an ant have?\nA:",
    "A capital do Brasil é Brasília, uma cidade planejada que foi inaugurada em",
    "Water boils at 100 degrees Celsius at sea level. On a high mountain it boils at a lower "
    "temperature because",
)

# Tokens per llama_decode call. Every position requests logits of n_vocab
# floats (262,144 for Gemma 3), so 64 tokens hold 64 MiB of logits.
DECODE_CHUNK_TOKENS = 64
# Positions per KL computation. The distributions are compared in float64:
# 16 positions of a 262,144-token vocabulary take 32 MiB per array.
COMPARE_CHUNK_POSITIONS = 16
MAX_SHOWN_PROBLEMS = 20  # in the text report; --json lists every problem
N_CTX = 2048  # context of the llama.cpp run, in tokens, unless the base's is shorter

# The pass threshold is derived from the base-versus-base agreement of the
# same run, because that disagreement (llama.cpp quantizes activations, keeps
# the KV cache in F16, sums in another order) is the floor any adapter sits on.
# Figures from the slow tests in tests/lora/test_check.py on Gemma 3 270M
# Q4_K_M with the built-in prompts (129 positions, 2 shared CPU cores):
#   without adapters:                        mean KL 0.0049, top-1 0.984
#   exported q/v/o adapter, own effect 0.09: mean KL 0.0062 (1.3x), top-1 0.977
#   random v_proj adapter, own effect 0.44:  mean KL 0.0087 (1.8x), top-1 0.961
#   that adapter, PEFT alpha 10% higher:     mean KL 0.030 (6x),    top-1 0.907
# Correct adapters with effects of 3 to 9 nats drifted 5x to 16x, probably
# because they move activations where the Q4_K error weighs more; for those
# the report offers an F16 merge.
# KL_FACTOR = 3 leaves room for the growth of moderate adapters and still
# fails that 10% scaling error.
KL_FACTOR = 3.0
# Below this mean KL (nats per token), a difference is negligible: on the tiny
# F32 test model the backends differ by about 1e-6 without adapters.
KL_FLOOR = 1e-4
# Top-1 differs only where the two leading tokens are nearly tied, so any
# change flips a few positions: 3 more of 129 with the v_proj adapter above.
# The margin allows 5 points, and at least 2 positions for short prompts.
TOP1_MARGIN = 0.05
TOP1_MARGIN_POSITIONS = 2

# GGUF tensor types that hold weights unquantized.
UNQUANTIZED_TYPES = frozenset({"F32", "F16", "BF16", "F64"})
# GGUF metadata value types that llama.cpp requires for the adapter keys it
# reads: gguf_get_val_str and gguf_get_val_f32 assert on any other type.
STRING_KEYS = ("general.type", "general.architecture", "adapter.type")
FLOAT32_KEYS = ("adapter.lora.alpha",)


class CheckVerdict(StrEnum):
    PASS = "pass"
    NUMERICS_FAILED = "numerics_failed"
    STRUCTURE_FAILED = "structure_failed"


EXIT_CODES = {
    CheckVerdict.PASS: 0,
    CheckVerdict.NUMERICS_FAILED: 1,
    CheckVerdict.STRUCTURE_FAILED: 2,
}


@dataclass(frozen=True)
class StructureReport:
    """The adapter file's targets and alpha, and every way it does not fit the base."""

    adapter: Path
    base: Path
    architecture: str | None  # of the adapter; None when the file is unreadable
    alpha: float | None  # None when adapter.lora.alpha is absent or invalid
    ranks: dict[str, int]  # GGUF base tensor name -> rank, for well-formed factor pairs
    base_quantized_types: tuple[str, ...]  # quantized tensor types in the base, e.g. Q4_K
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Agreement:
    """Agreement of two sets of next-token distributions over the same positions.

    KL divergences are KL(reference || measured) in nats per position, where
    the reference is transformers.
    """

    positions: int
    top1_agreement: float  # share of positions where both backends rank the same token first
    mean_kl: float
    max_kl: float


@dataclass(frozen=True)
class Threshold:
    max_mean_kl: float
    min_top1_agreement: float


@dataclass(frozen=True)
class NumericsReport:
    prompts: int
    base: Agreement  # transformers vs llama.cpp, both without adapters
    adapter: Agreement  # transformers + PEFT adapter vs llama.cpp + GGUF adapter
    # KL(transformers + PEFT adapter || transformers base): how much the adapter
    # changes the distributions at all.
    adapter_effect_kl: float
    threshold: Threshold
    seconds: float

    @property
    def kl_passed(self) -> bool:
        return self.adapter.mean_kl <= self.threshold.max_mean_kl

    @property
    def top1_passed(self) -> bool:
        return self.adapter.top1_agreement >= self.threshold.min_top1_agreement

    @property
    def passed(self) -> bool:
        return self.kl_passed and self.top1_passed


@dataclass(frozen=True)
class CheckReport:
    structure: StructureReport
    peft: Path | None = None
    numerics: NumericsReport | None = None  # None without a PEFT folder or on structure problems
    notes: tuple[str, ...] = field(default=())  # findings that do not decide the verdict
    merge_command: str | None = None  # offered when the quantized path drifts

    @property
    def verdict(self) -> CheckVerdict:
        if not self.structure.ok:
            return CheckVerdict.STRUCTURE_FAILED
        if self.numerics is not None and not self.numerics.passed:
            return CheckVerdict.NUMERICS_FAILED
        return CheckVerdict.PASS

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def to_json(self) -> dict[str, Any]:
        structure = asdict(self.structure)
        structure["adapter"] = str(self.structure.adapter)
        structure["base"] = str(self.structure.base)
        structure["ok"] = self.structure.ok
        numerics = None
        if self.numerics is not None:
            numerics = asdict(self.numerics)
            numerics["passed"] = self.numerics.passed
        return {
            "schema_version": SCHEMA_VERSION,
            "verdict": self.verdict.value,
            "exit_code": self.exit_code,
            "adapter": str(self.structure.adapter),
            "base": str(self.structure.base),
            "peft": str(self.peft) if self.peft else None,
            "structure": structure,
            "numerics": numerics,
            "notes": list(self.notes),
            "merge_command": self.merge_command,
        }


def check_adapter(
    adapter: Path,
    base: Path,
    peft: Path | None = None,
    prompts: Sequence[str] = BUILTIN_PROMPTS,
    cache_dir: Path | None = None,
    threads: int = 2,
) -> CheckReport:
    """Check that a GGUF adapter fits a base and, given its PEFT original, matches it.

    `cache_dir` contains the dequantized base for transformers (needed with `peft`).
    Problems of the adapter or base file are listed in the report. Invalid
    input beyond those raises LoraError: a PEFT folder that is missing or that
    A3X cannot convert, no prompts, or a prompt longer than the context.
    """
    from lora.peft_adapter import read_peft_adapter

    adapter, base = Path(adapter), Path(base)
    peft_adapter = read_peft_adapter(peft) if peft is not None else None
    if peft_adapter is not None and cache_dir is None:
        raise LoraError(
            "check_adapter needs cache_dir, a folder for the dequantized base model, when a "
            "PEFT adapter is given"
        )
    if not prompts:
        raise LoraError("no prompts to compare; give at least one non-empty prompt")

    structure = check_structure(adapter, base)
    log.info("lora.check.structure", adapter=str(adapter), problems=len(structure.problems))
    if not structure.ok or peft_adapter is None or cache_dir is None:
        return CheckReport(structure=structure, peft=peft_adapter.folder if peft_adapter else None)

    notes = _peft_notes(structure, peft_adapter)
    numerics = check_numerics(adapter, base, peft_adapter.folder, prompts, cache_dir, threads)
    return CheckReport(
        structure=structure,
        peft=peft_adapter.folder,
        numerics=numerics,
        notes=tuple(notes + _numerics_notes(structure, numerics)),
        merge_command=_offered_merge(structure, numerics),
    )


# Structure


def check_structure(adapter_path: Path, base_path: Path) -> StructureReport:
    """List every way the adapter file is malformed or does not fit the base, without llama.cpp."""
    problems: list[str] = []
    base: GGUFInfo | None = None
    try:
        base = check_model_file(base_path)
    except ModelFileError as error:
        problems.append(f"base: {error}")
    quantized = _quantized_types(base) if base else ()

    try:
        info = inspect_gguf(adapter_path)
    except ModelFileError as error:
        problems.append(f"adapter: {error}")
        return StructureReport(adapter_path, base_path, None, None, {}, quantized, tuple(problems))

    problems += _metadata_problems(info)
    if info.file_type != "adapter":
        # A model file's weights would each be reported as a stray tensor.
        return StructureReport(
            adapter_path, base_path, info.architecture, None, {}, quantized, tuple(problems)
        )
    alpha = _alpha(info)
    pairs, pair_problems = _factor_pairs(info)
    problems += pair_problems
    problems += _value_problems(info, pairs)
    if base is not None and pairs:
        problems += _fit_problems(GGUFAdapter(info, alpha or 0.0, pairs), base)
    ranks = {target: pair.rank for target, pair in sorted(pairs.items())}
    return StructureReport(
        adapter_path, base_path, info.architecture, alpha, ranks, quantized, tuple(problems)
    )


def _metadata_problems(info: GGUFInfo) -> list[str]:
    problems = []
    try:
        types = _metadata_types(info)
    except (ValueError, KeyError) as error:
        types = {}
        problems.append(f"the gguf package cannot read the adapter: {error}")
    for key in STRING_KEYS:
        if key in types and types[key] != "STRING":
            problems.append(
                f"metadata '{key}' is a {types[key]}, but llama.cpp reads it as a STRING and "
                "aborts on any other type; write it as a string"
            )
    for key in FLOAT32_KEYS:
        if key in types and types[key] != "FLOAT32":
            problems.append(
                f"metadata '{key}' is a {types[key]}, but llama.cpp reads it as a FLOAT32 and "
                "aborts on any other type; write it with add_float32"
            )
    if info.file_type != "adapter":
        problems.append(
            f"general.type is {info.file_type!r}, expected 'adapter'; is this a model file? "
            "Export a PEFT adapter with `a3x lora export`"
        )
    adapter_type = info.metadata.get("adapter.type")
    if adapter_type != "lora":
        problems.append(f"adapter.type is {adapter_type!r}, expected 'lora'")
    alpha = info.metadata.get("adapter.lora.alpha")
    if isinstance(alpha, int | float) and not isinstance(alpha, bool):
        if not math.isfinite(alpha) or alpha < 0:
            problems.append(
                f"adapter.lora.alpha is {alpha}; it must be a finite number of 0 or more "
                "(0 means llama.cpp applies B @ A unscaled)"
            )
    return problems


def _metadata_types(info: GGUFInfo) -> dict[str, str]:
    """Return the GGUF value type name of each key llama.cpp reads from an adapter."""
    import gguf

    # An adapter has a few small tensors and no vocabulary, so GGUFReader is
    # quick here, unlike on a model.
    reader = gguf.GGUFReader(info.path)
    types = {}
    for key in (*STRING_KEYS, *FLOAT32_KEYS):
        found = reader.fields.get(key)
        if found is not None and found.types:
            types[key] = found.types[0].name
    return types


def _alpha(info: GGUFInfo) -> float | None:
    alpha = info.metadata.get("adapter.lora.alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        return None
    return float(alpha) if math.isfinite(alpha) and alpha >= 0 else None


def _factor_pairs(info: GGUFInfo) -> tuple[dict[str, LoraPair], list[str]]:
    """Pair every `W.lora_a` with its `W.lora_b`; return the well-formed pairs and the problems.

    The factors of a pair are empty arrays of the numpy shapes, enough for the
    shape checks against the base.
    """
    problems = []
    tensors: dict[str, TensorInfo] = {}
    for tensor in info.tensors:
        if tensor.name in tensors:
            problems.append(f"tensor '{tensor.name}' appears twice; each name must be unique")
        tensors[tensor.name] = tensor

    pairs = {}
    for name, tensor in tensors.items():
        if name.endswith(LORA_B):
            if name.removesuffix(LORA_B) + LORA_A not in tensors:
                problems.append(f"'{name}' has no matching '{name.removesuffix(LORA_B)}.lora_a'")
            continue
        if not name.endswith(LORA_A):
            problems.append(
                f"tensor '{name}' is neither a lora_a nor a lora_b factor; A3X adapters "
                "contain LoRA factors only"
            )
            continue
        target = name.removesuffix(LORA_A)
        b_tensor = tensors.get(target + LORA_B)
        if b_tensor is None:
            problems.append(f"'{name}' has no matching '{target}.lora_b'")
            continue
        problem = _pair_shape_problem(target, tensor, b_tensor)
        if problem:
            problems.append(problem)
            continue
        (columns, rank), (_, rows) = tensor.shape, b_tensor.shape  # GGUF order
        pairs[target] = LoraPair(
            target, np.empty((rank, columns), np.float32), np.empty((rows, rank), np.float32)
        )
    return pairs, problems


def _pair_shape_problem(target: str, a: TensorInfo, b: TensorInfo) -> str | None:
    a_shape, b_shape = list(a.shape), list(b.shape)
    if len(a_shape) != 2 or len(b_shape) != 2:
        return (
            f"'{target}' has lora_a of GGUF shape {a_shape} and lora_b of {b_shape}; both "
            "factors must be matrices"
        )
    if a_shape[1] != b_shape[0] and a_shape[0] == b_shape[0]:
        return (
            f"'{target}': lora_a of GGUF shape {a_shape} looks transposed; it must be "
            f"[in, rank] = {[a_shape[1], a_shape[0]]} to match lora_b of GGUF shape {b_shape}"
        )
    if a_shape[1] != b_shape[0]:
        return (
            f"'{target}': lora_a has rank {a_shape[1]} (GGUF shape {a_shape}) but lora_b has "
            f"rank {b_shape[0]} (GGUF shape {b_shape}); lora_a must be [in, rank] and lora_b "
            "[rank, out] with the same rank"
        )
    if a_shape[1] == 0:
        return f"'{target}' has rank 0; drop the target or export it with a rank of 1 or more"
    return None


def _value_problems(info: GGUFInfo, pairs: dict[str, LoraPair]) -> list[str]:
    problems = []
    tensors = {tensor.name: tensor for tensor in info.tensors}
    for target in sorted(pairs):
        for suffix in (LORA_A, LORA_B):
            tensor = tensors[target + suffix]
            try:
                values = read_tensor(info, tensor)
            except (ModelFileError, ValueError, NotImplementedError) as error:
                problems.append(f"'{tensor.name}' ({tensor.type_name}) cannot be read: {error}")
                continue
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            if bad:
                problems.append(
                    f"'{tensor.name}' has {bad} NaN or infinite values; the adapter was trained "
                    "or saved badly, do not use it"
                )
    return problems


def _fit_problems(adapter: GGUFAdapter, base: GGUFInfo) -> list[str]:
    """Check names and shapes against the base; targets in blocks the base lacks are one problem."""
    blocks = base.block_count or 0
    beyond = {
        target: block
        for target in adapter.pairs
        if (block := block_of(target)) is not None and blocks and block >= blocks
    }
    inside = {t: pair for t, pair in adapter.pairs.items() if t not in beyond}
    problems = structure_problems(GGUFAdapter(adapter.info, adapter.alpha, inside), base)
    if beyond:
        lowest, highest = min(beyond.values()), max(beyond.values())
        span = f"block {lowest}" if lowest == highest else f"blocks {lowest}-{highest}"
        problems.append(
            f"the adapter modifies {span} ({len(beyond)} target(s), e.g. '{min(beyond)}') but "
            f"base '{base.name}' has {blocks} blocks (blk.0 to blk.{blocks - 1}); was it "
            "trained on a larger model?"
        )
    return problems


def _quantized_types(base: GGUFInfo) -> tuple[str, ...]:
    found = {t.type_name for t in base.tensors if len(t.shape) == 2}
    return tuple(sorted(found - UNQUANTIZED_TYPES))


# Numerics


def check_numerics(
    adapter: Path,
    base: Path,
    peft: Path,
    prompts: Sequence[str],
    cache_dir: Path,
    threads: int = 2,
) -> NumericsReport:
    """Compare next-token distributions of llama.cpp + GGUF adapter with transformers + PEFT.

    Call it only on an adapter that passed `check_structure`. Both backends see
    the same token ids (llama.cpp's tokenization, with the BOS token), and
    every position of every prompt counts.
    """
    from runtime.backend import ActiveAdapter
    from runtime.llama_cpp_backend import AdapterError, LlamaCppBackend
    from runtime.transformers_backend import AdapterLoadError, TransformersBackend

    started = time.perf_counter()
    log.info("lora.check.numerics_started", prompts=len(prompts), peft=str(peft))
    context_length = check_model_file(base).context_length or N_CTX
    llama = LlamaCppBackend(base, n_ctx=min(N_CTX, context_length), threads=threads)
    reference: TransformersBackend | None = None
    try:
        token_lists = [_tokenize(llama, prompt, index) for index, prompt in enumerate(prompts)]
        reference = TransformersBackend(base, cache_dir=cache_dir, threads=threads)

        # transformers first: the hidden states of all prompts are small
        # (positions x hidden size), the logits are computed from them later.
        base_hidden = [_hidden_states(reference, tokens) for tokens in token_lists]
        try:
            reference.set_adapters([ActiveAdapter(peft)])
        except AdapterLoadError as error:
            raise LoraError(f"transformers could not load the PEFT adapter: {error}") from error
        adapted_hidden = [_hidden_states(reference, tokens) for tokens in token_lists]

        base_tally, adapter_tally, effect_tally = _Tally(), _Tally(), _Tally()
        for tokens, hidden in zip(token_lists, base_hidden, strict=True):
            for start, logits in _llama_logits(llama, tokens):
                _compare_chunk(reference, hidden, start, logits, base_tally)
        try:
            llama.set_adapters([ActiveAdapter(adapter)])
        except AdapterError as error:
            raise LoraError(f"llama.cpp could not load the GGUF adapter: {error}") from error
        for tokens, hidden, plain in zip(token_lists, adapted_hidden, base_hidden, strict=True):
            for start, logits in _llama_logits(llama, tokens):
                _compare_chunk(reference, hidden, start, logits, adapter_tally, plain, effect_tally)
    finally:
        llama.close()
        if reference is not None:
            reference.close()

    base_agreement = base_tally.agreement()
    report = NumericsReport(
        prompts=len(prompts),
        base=base_agreement,
        adapter=adapter_tally.agreement(),
        adapter_effect_kl=effect_tally.agreement().mean_kl,
        threshold=derive_threshold(base_agreement),
        seconds=round(time.perf_counter() - started, 1),
    )
    log.info("lora.check.numerics_finished", seconds=report.seconds, passed=report.passed)
    return report


def derive_threshold(base: Agreement) -> Threshold:
    """Return the pass threshold for the adapter comparison from the base-versus-base one."""
    margin = max(TOP1_MARGIN, TOP1_MARGIN_POSITIONS / base.positions)
    return Threshold(
        max_mean_kl=max(KL_FACTOR * base.mean_kl, KL_FLOOR),
        min_top1_agreement=max(0.0, base.top1_agreement - margin),
    )


class _Tally:
    """Running sums of top-1 agreement and KL divergence over positions."""

    def __init__(self) -> None:
        self.positions = 0
        self.agreeing = 0
        self.kl_sum = 0.0
        self.kl_max = 0.0

    def add(self, reference: torch.Tensor, measured: torch.Tensor) -> None:
        """Add positions given as log-probabilities (float64, positions x vocabulary)."""
        kl = (reference.exp() * (reference - measured)).sum(dim=-1)
        # Rounding makes KL of nearly identical distributions slightly negative.
        kl = kl.clamp_min(0.0)
        self.positions += int(kl.shape[0])
        self.agreeing += int((reference.argmax(dim=-1) == measured.argmax(dim=-1)).sum())
        self.kl_sum += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max()))

    def agreement(self) -> Agreement:
        if not self.positions:
            raise LoraError("the prompts produced no positions to compare")
        return Agreement(
            positions=self.positions,
            top1_agreement=self.agreeing / self.positions,
            mean_kl=self.kl_sum / self.positions,
            max_kl=self.kl_max,
        )


def _tokenize(llama: LlamaCppBackend, prompt: str, index: int) -> list[int]:
    tokens = list(llama.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False))
    if len(tokens) > llama.llm.n_ctx():
        raise LoraError(
            f"prompt {index + 1} has {len(tokens)} tokens, more than the context of "
            f"{llama.llm.n_ctx()} that the check uses; split it into shorter prompts"
        )
    return tokens


def _hidden_states(reference: TransformersBackend, tokens: list[int]) -> torch.Tensor:
    """Return the decoder's last hidden states (positions x hidden size) for the tokens."""
    import torch

    with torch.inference_mode():
        ids = torch.tensor([tokens], dtype=torch.long)
        return reference.model.get_decoder()(input_ids=ids).last_hidden_state[0]


def _reference_log_probs(reference: TransformersBackend, hidden: torch.Tensor) -> torch.Tensor:
    """Return transformers' next-token log-probabilities (float64) for some positions.

    NOTE: this applies the output head and Gemma's final logit softcapping, as
    the transformers backend's scoring does. A model that scales its logits in
    another way (a logit_scale, for example) would be compared wrongly.
    """
    import torch

    with torch.inference_mode():
        logits = reference.model.get_output_embeddings()(hidden).double()
        softcap = getattr(reference.base_model.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return torch.log_softmax(logits, dim=-1)


def _llama_logits(llama: LlamaCppBackend, tokens: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """Decode the tokens in chunks and yield (first position, logits of every position).

    The logits array is a view of llama.cpp's buffer: it is valid only until
    the generator resumes.
    """
    from llama_cpp import _internals

    n_vocab = llama.llm.n_vocab()
    llama._reset_context()
    batch = _internals.LlamaBatch(n_tokens=DECODE_CHUNK_TOKENS, embd=0, n_seq_max=1, verbose=False)
    try:
        for start in range(0, len(tokens), DECODE_CHUNK_TOKENS):
            chunk = tokens[start : start + DECODE_CHUNK_TOKENS]
            batch.set_batch(chunk, n_past=start, logits_all=True)
            llama.llm._ctx.decode(batch)
            yield (
                start,
                np.ctypeslib.as_array(llama.llm._ctx.get_logits(), shape=(len(chunk), n_vocab)),
            )
    finally:
        batch.close()
        llama._reset_context()


def _compare_chunk(
    reference: TransformersBackend,
    hidden: torch.Tensor,
    start: int,
    llama_logits: np.ndarray,
    tally: _Tally,
    base_hidden: torch.Tensor | None = None,
    effect_tally: _Tally | None = None,
) -> None:
    """Tally llama.cpp's logits for positions start.. against transformers' distributions.

    With `base_hidden`, also tally the adapter's own effect in transformers
    (adapted against base distributions) into `effect_tally`.
    """
    import torch

    for offset in range(0, len(llama_logits), COMPARE_CHUNK_POSITIONS):
        rows = slice(start + offset, start + offset + COMPARE_CHUNK_POSITIONS)
        measured = torch.from_numpy(llama_logits[offset : offset + COMPARE_CHUNK_POSITIONS])
        measured = torch.log_softmax(measured.double(), dim=-1)
        expected = _reference_log_probs(reference, hidden[rows])
        tally.add(expected, measured)
        if base_hidden is not None and effect_tally is not None:
            effect_tally.add(expected, _reference_log_probs(reference, base_hidden[rows]))


# Advice after a numerics failure


def _numerics_notes(structure: StructureReport, numerics: NumericsReport) -> list[str]:
    notes = []
    if numerics.adapter_effect_kl <= numerics.threshold.max_mean_kl:
        notes.append(
            f"the adapter changes transformers' distributions by a mean KL of "
            f"{numerics.adapter_effect_kl:.3g}, not more than the threshold of "
            f"{numerics.threshold.max_mean_kl:.3g}; so this check cannot tell a correct export "
            "from one that does nothing"
        )
    if not numerics.passed and numerics.adapter.mean_kl >= 0.5 * numerics.adapter_effect_kl:
        notes.append(
            f"the drift (mean KL {numerics.adapter.mean_kl:.3g}) is at least half of the "
            f"adapter's own effect ({numerics.adapter_effect_kl:.3g}), which points to a wrong "
            "export (target names, row order or scaling) rather than to rounding"
        )
    if not numerics.passed and not structure.base_quantized_types:
        notes.append(
            "the base is not quantized, so the difference comes from the adapter file; "
            "export it again from the PEFT folder"
        )
    return notes


def _offered_merge(structure: StructureReport, numerics: NumericsReport) -> str | None:
    """Return the `a3x lora merge` command to an F16 model when a quantized base drifts."""
    if numerics.passed or not structure.base_quantized_types:
        return None
    adapter = structure.adapter
    output = adapter.with_name(f"{adapter.stem}-merged-f16.gguf")
    return merge_command(structure.base, adapter, output)


def merge_command(base: Path, adapter: Path, output: Path) -> str:
    """Return the shell command that merges an adapter into an F16 copy of the base."""
    return shlex.join(
        ["a3x", "lora", "merge", str(base), str(adapter), "-o", str(output), "--outtype", "f16"]
    )


def _peft_notes(structure: StructureReport, peft: PeftAdapter) -> list[str]:
    """Compare the GGUF adapter's targets and ranks with the PEFT original's.

    These are notes, not problems: the numerics decide, and the notes point
    to the cause when they fail.
    """
    from lora.names import NameMapError, gguf_name_of_module

    base = inspect_gguf(structure.base)
    architecture, blocks = base.architecture, base.block_count or 0
    try:
        mapped = {
            module: gguf_name_of_module(module, architecture, blocks) for module in peft.factors
        }
    except NameMapError as error:
        return [f"the PEFT modules cannot be mapped to GGUF names: {error}"]
    notes = [
        f"PEFT module '{module}' has no GGUF tensor in architecture '{architecture}'"
        for module, tensor in mapped.items()
        if tensor is None
    ]
    peft_ranks = {tensor: peft.rank(module) for module, tensor in mapped.items() if tensor}
    missing = sorted(set(peft_ranks) - set(structure.ranks))
    extra = sorted(set(structure.ranks) - set(peft_ranks))
    if missing:
        notes.append(
            f"the GGUF adapter lacks {len(missing)} target(s) that the PEFT adapter modifies, "
            f"e.g. '{missing[0]}'; export it again from the PEFT folder"
        )
    if extra:
        notes.append(
            f"the GGUF adapter modifies {len(extra)} tensor(s) that the PEFT adapter does not, "
            f"e.g. '{extra[0]}'; was it exported from another PEFT folder?"
        )
    differing = [
        tensor
        for tensor, rank in sorted(peft_ranks.items())
        if tensor in structure.ranks and structure.ranks[tensor] != rank
    ]
    if differing:
        first = differing[0]
        notes.append(
            f"{len(differing)} target(s) have another rank than in PEFT, e.g. '{first}' has "
            f"rank {structure.ranks[first]} in GGUF and {peft_ranks[first]} in PEFT"
        )
    return notes


# Command line


def read_prompts(path: Path) -> list[str]:
    """Read prompts from a UTF-8 text file, one per line; blank lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise LoraError(f"prompts file {path} does not exist") from error
    except UnicodeDecodeError as error:
        raise LoraError(f"prompts file {path} is not UTF-8 text ({error})") from error
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise LoraError(f"prompts file {path} has no prompts; write one prompt per line")
    return prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", type=Path, metavar="ADAPTER.gguf", help="GGUF LoRA adapter")
    parser.add_argument(
        "--base", type=Path, required=True, metavar="BASE.gguf", help="GGUF base model"
    )
    parser.add_argument(
        "--peft",
        type=Path,
        metavar="FOLDER",
        help="PEFT adapter folder the GGUF adapter was exported from; compares the "
        "next-token distributions of both",
    )
    parser.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        help="UTF-8 file with one prompt per line (default: a few built-in prompts)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def command(args: argparse.Namespace) -> int:
    from daemon.config import load_config, thread_count

    prompts = read_prompts(args.prompts) if args.prompts else list(BUILTIN_PROMPTS)
    config = load_config(args.config, home=args.home)
    cache_dir = config.home / "cache"
    report = check_adapter(
        args.adapter,
        args.base,
        peft=args.peft,
        prompts=prompts,
        cache_dir=cache_dir,
        threads=thread_count(config.model),
    )
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_report(report))
    sys.stdout.flush()
    return report.exit_code


def format_report(report: CheckReport) -> str:
    """Render a report as text for a terminal."""
    lines = [f"adapter {report.structure.adapter}", f"base    {report.structure.base}"]
    lines += _format_structure(report.structure)
    if report.numerics is not None:
        lines += _format_numerics(report.numerics)
    lines += [f"note: {note}" for note in report.notes]
    lines.append(_format_verdict(report))
    if report.merge_command:
        lines += [
            "If the drift comes from the quantized base, merge the adapter into an F16 model:",
            f"  {report.merge_command}",
        ]
    return "\n".join(lines)


def _format_structure(structure: StructureReport) -> list[str]:
    if not structure.ok:
        lines = [f"structure: {len(structure.problems)} problem(s)"]
        lines += [f"  - {problem}" for problem in structure.problems[:MAX_SHOWN_PROBLEMS]]
        hidden = len(structure.problems) - MAX_SHOWN_PROBLEMS
        if hidden > 0:
            lines.append(f"  - and {hidden} more; --json lists them all")
        return lines
    ranks = sorted(set(structure.ranks.values()))
    alpha = "absent (B @ A unscaled)" if structure.alpha is None else f"{structure.alpha:g}"
    return [
        f"structure: ok, architecture {structure.architecture}, {len(structure.ranks)} targets, "
        f"rank {', '.join(map(str, ranks))}, alpha {alpha}"
    ]


def _format_numerics(numerics: NumericsReport) -> list[str]:
    base, adapter, threshold = numerics.base, numerics.adapter, numerics.threshold
    return [
        f"numerics: {numerics.prompts} prompts, {base.positions} positions, "
        f"{numerics.seconds:g} s; KL(transformers || llama.cpp) in nats",
        f"  {'':16}{'base vs base':>14}{'adapter':>14}{'threshold':>14}",
        f"  {'top-1 agreement':16}{base.top1_agreement:>14.3f}{adapter.top1_agreement:>14.3f}"
        f"{'>= ' + format(threshold.min_top1_agreement, '.3f'):>14}",
        f"  {'mean KL':16}{base.mean_kl:>14.3g}{adapter.mean_kl:>14.3g}"
        f"{'<= ' + format(threshold.max_mean_kl, '.3g'):>14}",
        f"  {'max KL':16}{base.max_kl:>14.3g}{adapter.max_kl:>14.3g}",
        f"  adapter effect in transformers (mean KL against the base): "
        f"{numerics.adapter_effect_kl:.3g}",
    ]


def _format_verdict(report: CheckReport) -> str:
    verdict = report.verdict
    if verdict is CheckVerdict.STRUCTURE_FAILED:
        return "FAIL: the adapter does not fit the base; llama.cpp was not run"
    if verdict is CheckVerdict.NUMERICS_FAILED:
        return "FAIL: llama.cpp with the GGUF adapter drifts from transformers with PEFT"
    if report.numerics is None:
        return "PASS: the adapter fits the base (give --peft to compare numerics)"
    return "PASS: the adapter fits the base and llama.cpp matches PEFT"
