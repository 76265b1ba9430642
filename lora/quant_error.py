"""How much quantization changes a LoRA merge: per-tensor weight error and next-token shift.

The recipe:

1. merge the adapters into the base at F32 (`lora.merge`), the full-precision reference;
2. quantize that file with llama.cpp's own quantizer (`llama_model_quantize`, which
   also writes K-quants) to the type the served model would have;
3. for every tensor the adapters modify, compare the F32 weights with the quantized
   weights read back: mean and max absolute error, relative Frobenius norm;
4. run the same prompts through both files in llama.cpp and compare the next-token
   distributions at every position: mean KL divergence and top-1 agreement.

Results go to a folder: `errors.json` (everything), `errors.csv` (one row per
tensor) and one histogram PNG of the errors per layer block.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import io
import json
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from lora import LoraError
from lora.merge import merge_adapters, parse_adapter_spec
from runtime.backend import ActiveAdapter
from runtime.gguf_file import GGUFInfo, check_model_file, read_tensor

log = structlog.get_logger(__name__)

REPORT_FORMAT_VERSION = 1

# Completion prompts (the default model is a base model without a chat template).
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The three primary colors are red, blue and",
    "def add(a, b):\n    return",
    "Once upon a time, in a small village by the sea,",
    "The first five prime numbers are 2, 3, 5,",
)

# Positions per llama_decode call. Each position's logits are n_vocab float32
# values (1 MiB for Gemma 3's 262,144 tokens), so the logits of a chunk of 32
# take 32 MiB. Comparing one chunk needs about six arrays of that size.
CHUNK_POSITIONS = 32
PROMPT_CONTEXT = 1024  # llama.cpp context size, so the longest prompt in tokens
HISTOGRAM_BINS = 80


class QuantErrorError(LoraError):
    """The quantization error of a merge cannot be measured on these inputs."""


@dataclass(frozen=True)
class QuantType:
    """A llama.cpp model file type, such as Q4_K_M, and its `llama_ftype` value."""

    name: str
    ftype: int


@dataclass(frozen=True)
class TensorError:
    """The error of one modified tensor: quantized weights minus the F32 merged weights."""

    name: str
    base_type: str  # the tensor's type in the base model
    quantized_type: str  # the type llama.cpp's quantizer chose
    mean_abs_error: float
    max_abs_error: float
    relative_frobenius: float  # ||W_q - W|| / ||W||; 0 when both are 0


@dataclass(frozen=True)
class DistributionShift:
    """Next-token distributions of the quantized merge against the F32 merge."""

    prompts: int
    positions: int  # one next-token distribution per prompt token
    mean_kl: float  # KL(P_f32 || P_quantized) in nats, averaged over positions
    max_kl: float
    top1_agreement: float  # share of positions where both pick the same most likely token


@dataclass(frozen=True)
class QuantErrorReport:
    base: Path
    adapters: tuple[ActiveAdapter, ...]
    quant_type: str
    tensors: tuple[TensorError, ...]
    shift: DistributionShift
    # Tensors the adapters do not modify but whose type the quantizer changed;
    # the distribution shift includes their error too.
    other_changed_tensors: tuple[str, ...]
    out_dir: Path
    files: tuple[str, ...]  # written into out_dir
    seconds: float
    histograms: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False, default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": REPORT_FORMAT_VERSION,
            "base": str(self.base),
            "adapters": [{"path": str(a.path), "scale": a.scale} for a in self.adapters],
            "quant_type": self.quant_type,
            "tensors": [asdict(tensor) for tensor in self.tensors],
            "shift": asdict(self.shift),
            "other_changed_tensors": list(self.other_changed_tensors),
            "out_dir": str(self.out_dir),
            "files": list(self.files),
            "seconds": round(self.seconds, 3),
        }


def measure_quant_error(
    base_path: Path | str,
    adapters: Sequence[ActiveAdapter],
    out_dir: Path | str,
    quant_type: str | None = None,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    threads: int = 2,
    keep_models: bool = False,
) -> QuantErrorReport:
    """Measure the quantization error of merging `adapters` into the base; write the report.

    `quant_type` is a llama.cpp file type name (Q4_K_M, Q8_0, F16, F32, ...); None
    takes the base's own `general.file_type`. With `keep_models` the reference
    merge (modified tensors in F32, the others in their base types) and its
    quantized form stay in `out_dir` as merged-reference.gguf and merged-<type>.gguf.
    """
    started = time.perf_counter()
    base = check_model_file(base_path)
    chosen = resolve_quant_type(quant_type, base)
    if not prompts:
        raise QuantErrorError("no prompts to compare; give at least one non-empty prompt")
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)

    with contextlib.ExitStack() as stack:
        work_dir = out_dir
        if not keep_models:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=out_dir)))

        # Merge at full precision, then quantize the merge with llama.cpp.
        # The reference has its modified tensors in F32 and the others in their base types.
        reference_path = work_dir / "merged-reference.gguf"
        merged = merge_adapters(base.path, adapters, reference_path, outtype="f32")
        quantized_path = work_dir / f"merged-{chosen.name.lower()}.gguf"
        quantize_model(reference_path, quantized_path, chosen, threads)

        # Compare the weights, then the next-token distributions.
        reference = check_model_file(reference_path)
        quantized = check_model_file(quantized_path)
        names = [tensor.name for tensor in merged.tensors]
        errors, histograms = compare_tensors(base, reference, quantized, names)
        shift = compare_distributions(reference_path, quantized_path, prompts, threads)
        other_changed = changed_tensor_types(base, quantized, exclude=set(names))

    report = QuantErrorReport(
        base=base.path,
        adapters=tuple(adapters),
        quant_type=chosen.name,
        tensors=tuple(errors),
        shift=shift,
        other_changed_tensors=tuple(other_changed),
        out_dir=out_dir,
        files=(),
        seconds=0.0,
        histograms=histograms,
    )

    # Report files: the histograms first, so errors.json can list every file.
    plots = plot_histograms(report, out_dir)
    models = [reference_path.name, quantized_path.name] if keep_models else []
    report = replace(
        report,
        files=("errors.json", "errors.csv", *plots, *models),
        seconds=time.perf_counter() - started,
    )
    write_tables(report, out_dir)
    log.info(
        "lora.quant_error.measured",
        base=str(base.path),
        quant_type=chosen.name,
        tensors=len(errors),
        mean_kl=shift.mean_kl,
        seconds=round(report.seconds, 2),
    )
    return report


# Quantizing with llama.cpp


def resolve_quant_type(name: str | None, base: GGUFInfo) -> QuantType:
    """Return the llama.cpp file type named `name`, or the base's own when `name` is None."""
    types = _llama_file_types()
    if name is None:
        ftype = base.metadata.get("general.file_type")
        by_value = {value: key for key, value in types.items()}
        if not isinstance(ftype, int) or ftype not in by_value:
            raise QuantErrorError(
                f"base {base.path} has general.file_type {ftype!r}, which names no llama.cpp "
                "type; give the served type with --type, for example --type Q4_K_M"
            )
        return QuantType(by_value[ftype], ftype)
    key = name.strip().upper()
    if key not in types:
        raise QuantErrorError(
            f"type {name!r} is not a llama.cpp quantization type; use one of "
            f"{', '.join(sorted(types))}"
        )
    return QuantType(key, types[key])


def _llama_file_types() -> dict[str, int]:
    """Map type names (Q4_K_M, F32, ...) to the installed llama.cpp's `llama_ftype` values."""
    import llama_cpp

    types = {}
    for attribute in dir(llama_cpp):
        found = re.fullmatch(r"LLAMA_FTYPE_(?:MOSTLY|ALL)_(\w+)", attribute)
        if found:
            types[found.group(1)] = int(getattr(llama_cpp, attribute))
    return types


def quantize_model(source: Path, target: Path, quant_type: QuantType, threads: int) -> None:
    """Quantize a GGUF model with llama.cpp's `llama_model_quantize`.

    Requantizing is allowed, so a tensor that is already quantized in `source`
    but gets another type in `quant_type`'s mix is dequantized and quantized again.
    """
    import llama_cpp

    if target.exists() and target.resolve() == source.resolve():
        # llama.cpp would truncate the file it reads from and crash with SIGBUS.
        raise QuantErrorError(f"quantizing {source} onto itself; give another target file")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quant_type.ftype
    params.nthread = threads
    params.allow_requantize = True
    # llama.cpp logs every tensor through llama-cpp-python's callback, which
    # prints to sys.stderr; keep it for the error message only.
    messages = io.StringIO()
    with contextlib.redirect_stderr(messages):
        code = llama_cpp.llama_model_quantize(
            str(source).encode(), str(target).encode(), ctypes.byref(params)
        )
    if code != 0:
        target.unlink(missing_ok=True)
        errors = [line for line in messages.getvalue().splitlines() if "error" in line.lower()]
        detail = "; ".join(errors[-3:]) or "no error message"
        raise QuantErrorError(
            f"llama.cpp's llama_model_quantize failed to quantize {source.name} to "
            f"{quant_type.name} (code {code}: {detail}); try another --type"
        )


def changed_tensor_types(base: GGUFInfo, quantized: GGUFInfo, exclude: set[str]) -> list[str]:
    """Return the tensors outside `exclude` whose type differs between the two files."""
    base_types = {tensor.name: tensor.type_name for tensor in base.tensors}
    return [
        tensor.name
        for tensor in quantized.tensors
        if tensor.name not in exclude and base_types.get(tensor.name) != tensor.type_name
    ]


# Comparing weights


def compare_tensors(
    base: GGUFInfo, reference: GGUFInfo, quantized: GGUFInfo, names: Sequence[str]
) -> tuple[list[TensorError], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Return the error of each named tensor and its error histogram (counts, bin edges)."""
    base_types = {tensor.name: tensor.type_name for tensor in base.tensors}
    reference_tensors = {tensor.name: tensor for tensor in reference.tensors}
    quantized_tensors = {tensor.name: tensor for tensor in quantized.tensors}
    errors, histograms = [], {}
    for name in names:
        weight = read_tensor(reference, reference_tensors[name])
        stored = quantized_tensors[name]
        error = read_tensor(quantized, stored) - weight
        errors.append(_tensor_error(name, base_types[name], stored.type_name, weight, error))
        histograms[name] = _histogram(error)
    return errors, histograms


def _tensor_error(
    name: str, base_type: str, quantized_type: str, weight: np.ndarray, error: np.ndarray
) -> TensorError:
    absolute = np.abs(error, dtype=np.float64)
    error_norm = float(np.linalg.norm(error.astype(np.float64)))
    weight_norm = float(np.linalg.norm(weight.astype(np.float64)))
    if weight_norm > 0:
        relative = error_norm / weight_norm
    else:
        relative = 0.0 if error_norm == 0 else float("inf")
    return TensorError(
        name=name,
        base_type=base_type,
        quantized_type=quantized_type,
        mean_abs_error=float(absolute.mean()),
        max_abs_error=float(absolute.max()),
        relative_frobenius=relative,
    )


def _histogram(error: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    limit = float(np.abs(error).max()) or 1e-12  # an exact match still gets a range
    return np.histogram(error, bins=HISTOGRAM_BINS, range=(-limit, limit))


# Comparing next-token distributions


def compare_distributions(
    reference_path: Path, candidate_path: Path, prompts: Sequence[str], threads: int
) -> DistributionShift:
    """Compare the next-token distributions of two models with the same tokenizer.

    The reference's log-probabilities (n_vocab float32 values per position) are
    stored in a temporary file next to the candidate, so only one model and one
    chunk of positions are in memory at a time.
    """
    from runtime.llama_cpp_backend import LlamaCppBackend

    with tempfile.TemporaryFile(dir=candidate_path.parent) as store_file:
        token_lists, store = _reference_log_probs(reference_path, prompts, threads, store_file)
        candidate = LlamaCppBackend(candidate_path, n_ctx=PROMPT_CONTEXT, threads=threads)
        try:
            kl, agree = _divergence(candidate, token_lists, store)
        finally:
            candidate.close()
            del store

    return DistributionShift(
        prompts=len(prompts),
        positions=len(kl),
        mean_kl=float(np.mean(kl)),
        max_kl=float(np.max(kl)),
        top1_agreement=float(np.mean(agree)),
    )


def _reference_log_probs(
    path: Path, prompts: Sequence[str], threads: int, store_file: Any
) -> tuple[list[list[int]], np.ndarray]:
    """Tokenize the prompts and store the model's log-probabilities at every position."""
    from runtime.llama_cpp_backend import LlamaCppBackend

    reference = LlamaCppBackend(path, n_ctx=PROMPT_CONTEXT, threads=threads)
    try:
        token_lists = [_tokenize(reference, prompt) for prompt in prompts]
        positions = sum(len(tokens) for tokens in token_lists)
        shape = (positions, reference.llm.n_vocab())
        store = np.memmap(store_file, dtype=np.float32, mode="w+", shape=shape)
        row = 0
        for tokens in token_lists:
            for logits in next_token_logits(reference, tokens):
                store[row : row + len(logits)] = _log_softmax(logits)
                row += len(logits)
    finally:
        reference.close()
    return token_lists, store


def _divergence(
    candidate: Any, token_lists: Sequence[list[int]], store: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return per position KL(reference || candidate) and whether the top-1 tokens agree."""
    kl = np.empty(len(store), dtype=np.float64)
    agree = np.empty(len(store), dtype=bool)
    row = 0
    for tokens in token_lists:
        for logits in next_token_logits(candidate, tokens):
            candidate_log_p = _log_softmax(logits)
            reference_log_p = np.asarray(store[row : row + len(logits)])
            rows = slice(row, row + len(logits))
            difference = reference_log_p - candidate_log_p
            kl[rows] = np.sum(np.exp(reference_log_p) * difference, axis=1, dtype=np.float64)
            agree[rows] = reference_log_p.argmax(axis=1) == candidate_log_p.argmax(axis=1)
            row += len(logits)
    return kl, agree


def _tokenize(backend: Any, prompt: str) -> list[int]:
    tokens: list[int] = backend.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
    if len(tokens) > PROMPT_CONTEXT:
        raise QuantErrorError(
            f"prompt {prompt[:40]!r}... has {len(tokens)} tokens, more than "
            f"{PROMPT_CONTEXT}; shorten it"
        )
    return tokens


def next_token_logits(backend: Any, tokens: Sequence[int]) -> Iterator[np.ndarray]:
    """Yield the logits at every position of `tokens`, CHUNK_POSITIONS rows at a time.

    The rows are views of llama.cpp's logits buffer, valid until the next chunk.
    """
    from llama_cpp import _internals

    llm = backend.llm
    n_vocab = llm.n_vocab()
    llm.reset()
    llm._ctx.kv_cache_clear()
    batch = _internals.LlamaBatch(n_tokens=CHUNK_POSITIONS, embd=0, n_seq_max=1, verbose=False)
    try:
        for start in range(0, len(tokens), CHUNK_POSITIONS):
            chunk = list(tokens[start : start + CHUNK_POSITIONS])
            batch.set_batch(chunk, n_past=start, logits_all=True)
            llm._ctx.decode(batch)
            yield np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(chunk), n_vocab))
    finally:
        batch.close()
        llm.reset()
        llm._ctx.kv_cache_clear()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32, with the normalizer summed in float64."""
    peak = logits.max(axis=1, keepdims=True)
    shifted = logits - peak
    log_norm = np.log(np.exp(shifted).sum(axis=1, keepdims=True, dtype=np.float64))
    return (shifted - log_norm).astype(np.float32)


# Report files


def write_tables(report: QuantErrorReport, out_dir: Path) -> None:
    """Write errors.json (the whole report) and errors.csv (one row per tensor)."""
    (out_dir / "errors.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    with (out_dir / "errors.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "tensor",
                "base_type",
                "quantized_type",
                "mean_abs_error",
                "max_abs_error",
                "relative_frobenius",
            ]
        )
        for tensor in report.tensors:
            writer.writerow(
                [
                    tensor.name,
                    tensor.base_type,
                    tensor.quantized_type,
                    f"{tensor.mean_abs_error:.6g}",
                    f"{tensor.max_abs_error:.6g}",
                    f"{tensor.relative_frobenius:.6g}",
                ]
            )


def plot_histograms(report: QuantErrorReport, out_dir: Path) -> list[str]:
    """Write one PNG of error histograms per layer block; return the file names."""
    # The object-oriented API renders with Agg without touching pyplot's global backend.
    from matplotlib.figure import Figure

    groups: dict[str, list[TensorError]] = {}
    for tensor in report.tensors:
        groups.setdefault(_layer_group(tensor.name), []).append(tensor)
    names = []
    for group, tensors in groups.items():
        figure = Figure(figsize=(6.4, 3.2), dpi=80)
        axes = figure.add_subplot()
        for tensor in tensors:
            counts, edges = report.histograms[tensor.name]
            label = f"{tensor.name.removeprefix(group + '.')} ({tensor.quantized_type})"
            axes.stairs(counts, edges, label=label)
        axes.set_yscale("log")
        axes.set_xlabel("quantized - F32 merged weight")
        axes.set_ylabel("weights")
        axes.set_title(f"{group}: quantization error, {report.quant_type}", fontsize=10)
        axes.legend(fontsize=7)
        figure.tight_layout()
        name = f"hist-{group}.png"
        figure.savefig(out_dir / name)
        names.append(name)
    return names


def _layer_group(tensor_name: str) -> str:
    """Return the layer block of a tensor (`blk.3`), or its own name outside the blocks."""
    found = re.match(r"blk\.\d+", tensor_name)
    return found.group(0) if found else tensor_name.removesuffix(".weight")


def format_report(report: QuantErrorReport) -> str:
    """Return the text report: a per-tensor table, the distribution shift and the files."""
    lines = [
        f"Quantized the F32 merge of {len(report.adapters)} adapter(s) into "
        f"{report.base.name} to {report.quant_type} with llama.cpp ({report.seconds:.1f} s)."
    ]
    width = max(len("tensor"), *(len(tensor.name) for tensor in report.tensors))
    lines.append(
        f"{'tensor':<{width}}  {'base':<6}  {'quant':<6}  {'mean |err|':>10}  "
        f"{'max |err|':>10}  {'rel. Frob.':>10}"
    )
    for tensor in report.tensors:
        lines.append(
            f"{tensor.name:<{width}}  {tensor.base_type:<6}  {tensor.quantized_type:<6}  "
            f"{tensor.mean_abs_error:>10.3e}  {tensor.max_abs_error:>10.3e}  "
            f"{tensor.relative_frobenius:>10.3%}"
        )
    shift = report.shift
    lines.append(
        f"Next-token distributions over {shift.prompts} prompt(s), {shift.positions} "
        f"position(s): mean KL {shift.mean_kl:.3e} nats (max {shift.max_kl:.3e}), "
        f"top-1 agreement {shift.top1_agreement:.1%}."
    )
    if report.other_changed_tensors:
        lines.append(
            f"{len(report.other_changed_tensors)} tensor(s) the adapters do not modify also "
            "changed type in the quantized model, so the KL includes their error too."
        )
    lines.append(f"Wrote {', '.join(report.files)} to {report.out_dir}.")
    return "\n".join(lines)


# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", type=Path, metavar="BASE.gguf", help="the GGUF base model")
    parser.add_argument(
        "adapters",
        nargs="+",
        metavar="ADAPTER.gguf[:SCALE]",
        help="a GGUF LoRA adapter and its scale (default 1; a negative scale subtracts it)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder for the report files"
    )
    parser.add_argument(
        "--type",
        dest="quant_type",
        metavar="TYPE",
        help="llama.cpp type of the served model, such as Q4_K_M, Q8_0 or F16 "
        "(default: the base model's general.file_type)",
    )
    parser.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        help="text file with one completion prompt per line (default: built-in prompts)",
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=2, help="llama.cpp threads (default: 2)"
    )
    parser.add_argument(
        "--keep-models",
        action="store_true",
        help="keep the F32 and the quantized merged models in DIR",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def command(args: argparse.Namespace) -> int:
    adapters = [parse_adapter_spec(text) for text in args.adapters]
    prompts = read_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
    report = measure_quant_error(
        args.base,
        adapters,
        args.out,
        quant_type=args.quant_type,
        prompts=prompts,
        threads=args.threads,
        keep_models=args.keep_models,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1; give 1 or more threads")
    return value


def read_prompts(path: Path) -> list[str]:
    """Read one prompt per non-empty line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise QuantErrorError(
            f"cannot read prompts file {path} ({error}); give a UTF-8 text file"
        ) from error
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise QuantErrorError(f"prompts file {path} has no non-empty lines; add one prompt a line")
    return prompts
