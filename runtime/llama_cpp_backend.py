"""The llama.cpp backend (through llama-cpp-python), the default for GGUF models."""

from __future__ import annotations

import ctypes
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from runtime.adapter_cache import AdapterCache, AdapterError
from runtime.backend import ActiveAdapter, Generation, LogLikelihood, MemoryUsage, SamplingParams
from runtime.gguf_file import ModelFileError, check_model_file, inspect_gguf
from runtime.memory import process_memory

__all__ = ["DEFAULT_ADAPTER_BUDGET_BYTES", "AdapterError", "LlamaCppBackend"]

log = structlog.get_logger(__name__)

# Tokens per llama_decode call when scoring a text. Each call requests logits
# for every token, n_vocab floats each (262,144 for Gemma 3), so 64 tokens
# take 64 MiB of logits. Larger chunks run faster per token (128 tokens took
# 2.5x less time per token than 32 in a run on 2 cores) but hold more memory.
SCORE_CHUNK_TOKENS = 64

# Bytes of LoRA tensors kept loaded at once. A rank-8 adapter on the attention
# projections (q, k, v, o) of all 18 blocks of Gemma 3 270M holds 2.8 MiB in
# float32, so 256 MiB keeps 91 of them, next to a 241 MiB base model file.
DEFAULT_ADAPTER_BUDGET_BYTES = 256 * 2**20


class LlamaCppBackend:
    name = "llama_cpp"

    def __init__(
        self,
        model_path: Path,
        n_ctx: int = 2048,
        threads: int = 2,
        seed: int = 0,
        adapter_budget_bytes: int = DEFAULT_ADAPTER_BUDGET_BYTES,
        derived_dir: Path | None = None,
    ):
        import llama_cpp

        self.model_path = Path(model_path)
        self.info = check_model_file(self.model_path)
        self._llama_cpp = llama_cpp
        from llama_cpp._utils import suppress_stdout_stderr

        # llama.cpp prints notes such as "using full-size SWA cache" to stderr even
        # with verbose=False; they would break the JSON lines of the log.
        try:
            with suppress_stdout_stderr(disable=False):
                self.llm = llama_cpp.Llama(
                    model_path=str(self.model_path),
                    n_ctx=n_ctx,
                    n_threads=threads,
                    n_threads_batch=threads,
                    seed=seed,
                    verbose=False,
                )
        except ValueError as error:  # llama-cpp-python's message for a failed load
            raise ModelFileError(f"llama.cpp could not load {self.model_path}: {error}") from error
        # Loaded adapters, freed least recently used first beyond the budget. Other
        # components prefetch, pin and evict adapters through it.
        self.adapter_cache = AdapterCache(
            adapter_budget_bytes,
            inspect=self._inspect_adapter,
            load=self._init_adapter,
            free=llama_cpp.llama_adapter_lora_free,
        )
        self._active: tuple[ActiveAdapter, ...] = ()
        # Adapters with per-layer scales are loaded from derived files (lora/layers.py),
        # cached under derived_dir by content hash; without one, in a temporary folder.
        self.derived_dir = derived_dir
        self._temporary_dir: tempfile.TemporaryDirectory[str] | None = None
        self._derived: dict[tuple[Path, tuple[int, int], Any], Path] = {}

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        started = time.perf_counter()
        result: Any = self.llm.create_completion(
            prompt,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            repeat_penalty=params.repeat_penalty,
            stop=list(params.stop) or None,
            seed=params.seed,
        )
        wall = time.perf_counter() - started
        choice = result["choices"][0]
        usage = result["usage"]
        return Generation(
            text=choice["text"],
            prompt_tokens=int(usage["prompt_tokens"]),
            completion_tokens=int(usage["completion_tokens"]),
            wall_seconds=wall,
            finish_reason=str(choice.get("finish_reason") or "stop"),
        )

    def log_likelihood(self, text: str) -> LogLikelihood:
        from llama_cpp import _internals

        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        if len(tokens) > self.llm.n_ctx():
            raise ValueError(
                f"text has {len(tokens)} tokens, more than the context of {self.llm.n_ctx()}; "
                "score it in pieces or raise model.n_ctx"
            )
        n_vocab = self.llm.n_vocab()
        self._reset_context()
        batch = _internals.LlamaBatch(
            n_tokens=SCORE_CHUNK_TOKENS, embd=0, n_seq_max=1, verbose=False
        )
        total = 0.0
        try:
            # The logits at position i predict token i + 1; the last position predicts nothing.
            for start in range(0, len(tokens) - 1, SCORE_CHUNK_TOKENS):
                chunk = tokens[start : start + SCORE_CHUNK_TOKENS]
                batch.set_batch(chunk, n_past=start, logits_all=True)
                self.llm._ctx.decode(batch)
                logits = np.ctypeslib.as_array(
                    self.llm._ctx.get_logits(), shape=(len(chunk), n_vocab)
                )
                targets = np.asarray(tokens[start + 1 : start + 1 + len(chunk)])
                total += float(np.sum(_log_softmax_at(logits[: len(targets)], targets)))
        finally:
            batch.close()
            self._reset_context()
        return LogLikelihood(total=total, tokens=len(tokens) - 1)

    def set_adapters(self, adapters: Sequence[ActiveAdapter]) -> None:
        """Apply `adapters` (loading them if needed) in place of the current set.

        An adapter listed twice is applied once with the sum of its scales,
        because llama.cpp keeps one scale per loaded adapter.
        """
        adapters = tuple(adapters)
        if adapters == self._active:
            return
        scales: dict[Path, float] = {}
        for adapter in adapters:
            path = self._file_of(adapter)
            scales[path] = scales.get(path, 0.0) + adapter.scale
        handles = self.adapter_cache.activate(list(scales), detach=self._detach_adapters)
        try:
            self._apply(handles, list(scales.values()))
        except AdapterError:
            # The cache now protects the new set, so llama.cpp must not keep the old one.
            self._detach_adapters()
            raise
        self._active = adapters
        # A cached prompt was computed with the previous adapters or scales.
        self._reset_context()

    def prefetch_adapters(self, adapters: Sequence[ActiveAdapter]) -> list[Path]:
        """Load the adapters in order into the adapter cache while they fit its budget.
        The files of those that do not fit are read ahead into the page cache. Return
        the files now loaded, derived files for adapters with per-layer scales."""
        files = self._files_of(adapters, "adapters.prefetch_invalid")
        return self.adapter_cache.prefetch(files, skip_invalid=True)

    def pin_adapters(self, adapters: Sequence[ActiveAdapter]) -> list[Path]:
        """Pin the adapters in the adapter cache, so that eviction never frees them, and
        unpin every other. An adapter that is invalid or over the budget is skipped."""
        files = self._files_of(adapters, "adapters.pin_failed")
        for entry in self.adapter_cache.entries():
            if entry.pinned and entry.path not in files:
                self.adapter_cache.unpin(entry.path)
        pinned = []
        for path in files:
            try:
                self.adapter_cache.pin(path)
            except AdapterError as error:
                log.warning("adapters.pin_failed", path=str(path), error=str(error))
                continue
            pinned.append(path)
        return pinned

    def memory(self) -> MemoryUsage:
        rss, peak = process_memory()
        return MemoryUsage(
            rss_bytes=rss, peak_rss_bytes=peak, model_file_bytes=self.info.size_bytes
        )

    def close(self) -> None:
        # Adapters go before the model: freeing the model frees the adapters
        # that are still loaded on it.
        self._detach_adapters()
        self.adapter_cache.close()
        self.llm.close()
        if self._temporary_dir is not None:
            self._temporary_dir.cleanup()

    def _files_of(self, adapters: Sequence[ActiveAdapter], event: str) -> list[Path]:
        """Return the files of the adapters that have one, logging `event` for the others."""
        files = []
        for adapter in adapters:
            try:
                files.append(self._file_of(adapter))
            except AdapterError as error:
                log.warning(event, path=str(adapter.path), error=str(error))
        return files

    def _file_of(self, adapter: ActiveAdapter) -> Path:
        """Return the file llama.cpp loads for `adapter`: its own, or with per-layer
        scales the derived file, made once per file version and scales."""
        path = Path(os.path.abspath(adapter.path))
        if adapter.layers is None or adapter.layers.is_identity:
            return path
        from lora.layers import LayerScalesError, derive_adapter

        try:
            stat = path.stat()
        except OSError as error:
            raise AdapterError(f"adapter {path} could not be read: {error}") from error
        key = (path, (stat.st_size, stat.st_mtime_ns), adapter.layers)
        derived = self._derived.get(key)
        if derived is not None and derived.exists():
            return derived
        if self.derived_dir is None and self._temporary_dir is None:
            self._temporary_dir = tempfile.TemporaryDirectory(prefix="a3x-derived-adapters-")
        folder = self.derived_dir or Path(self._temporary_dir.name)  # type: ignore[union-attr]
        try:
            derived = derive_adapter(path, adapter.layers, folder, self.info.block_count)
        except (LayerScalesError, ModelFileError, OSError) as error:
            raise AdapterError(f"per-layer scales for {path}: {error}") from error
        self._derived[key] = derived
        return derived

    def _apply(self, handles: list[Any], scales: list[float]) -> None:
        count = len(handles)
        array = (self._llama_cpp.llama_adapter_lora_p_ctypes * max(count, 1))(*handles)
        factors = (ctypes.c_float * max(count, 1))(*scales)
        code = self._llama_cpp.llama_set_adapters_lora(
            self.llm._ctx.ctx, array if count else None, count, factors if count else None
        )
        if code != 0:
            raise AdapterError(
                f"llama.cpp rejected the adapter set {self.adapter_cache.active} (code {code})"
            )

    def _detach_adapters(self) -> None:
        """Make llama.cpp apply no adapter, so that the cache may free the previous set."""
        self._apply([], [])
        self._active = ()
        self._reset_context()

    def _inspect_adapter(self, path: Path) -> int:
        """Validate an adapter file against the base in Python; return its tensor bytes.

        llama.cpp aborts the process on some mismatched adapters, so nothing
        reaches `llama_adapter_lora_init` unchecked.
        """
        from lora.gguf_adapter import AdapterFormatError, check_fits_base, read_gguf_adapter

        try:
            adapter = read_gguf_adapter(path, load_tensors=False)
        except AdapterFormatError as error:
            info = inspect_gguf(path)
            if info.file_type != "adapter":
                raise AdapterError(
                    f"{path} is a GGUF {info.file_type}, not a LoRA adapter (general.type=adapter)"
                ) from error
            raise AdapterError(str(error)) from error
        except ModelFileError as error:  # no readable GGUF header or tensor table
            raise AdapterError(str(error)) from error
        if adapter.architecture != self.info.architecture:
            raise AdapterError(
                f"adapter {path} is for architecture '{adapter.architecture}' but the base "
                f"{self.model_path.name} is '{self.info.architecture}'; use an adapter trained "
                "on this base"
            )
        try:
            check_fits_base(adapter, self.info)
        except AdapterFormatError as error:
            raise AdapterError(str(error)) from error
        return adapter.resident_bytes

    def _init_adapter(self, path: Path) -> Any:
        from llama_cpp._utils import suppress_stdout_stderr

        # llama.cpp notes such as "cannot use buft 'CPU_REPACK', fallback to CPU" (one
        # per Q4_K target) would break the JSON lines of the log.
        with suppress_stdout_stderr(disable=False):
            handle = self._llama_cpp.llama_adapter_lora_init(self.llm.model, str(path).encode())
        if not handle:
            raise AdapterError(
                f"llama.cpp could not load adapter {path} on base {self.model_path.name}; "
                "check that its tensor names and shapes match the base"
            )
        return handle

    def _reset_context(self) -> None:
        """Forget every cached token, so that no later decode reuses them.

        `reset` stops create_completion from matching a cached prompt prefix,
        and clearing the KV cache's cell metadata (data=False) stops any
        decode from attending to old cells. Clearing the data too would
        memset the whole KV cache: 0.58 ms median and 5 ms p99 for Gemma 3
        270M at n_ctx 2048, against 4 us without (measured on 2 busy cores).
        """
        self.llm.reset()
        memory = self.llm._ctx.memory
        if memory is not None:  # non-causal embedding models may have no KV cache
            self._llama_cpp.llama_memory_clear(memory, False)


def _log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) per row. exp runs in float32 (a float64 copy of 64 rows of a
    262k vocabulary costs more than the decode); the sums are taken in float64."""
    peak = logits.max(axis=1)
    shifted = np.exp(logits - peak[:, None])
    log_norm = np.log(shifted.sum(axis=1, dtype=np.float64)) + peak
    return logits[np.arange(len(targets)), targets].astype(np.float64) - log_norm
