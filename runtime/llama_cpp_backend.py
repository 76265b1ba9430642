"""The llama.cpp backend (through llama-cpp-python), the default for GGUF models."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backend import ActiveAdapter, Generation, LogLikelihood, MemoryUsage, SamplingParams
from runtime.gguf_file import ModelFileError, check_model_file, inspect_gguf
from runtime.memory import process_memory

# Tokens per llama_decode call when scoring a text. Each call requests logits
# for every token, n_vocab floats each (262,144 for Gemma 3), so 64 tokens
# take 64 MiB of logits. Larger chunks run faster per token (128 tokens took
# 2.5x less time per token than 32 in a run on 2 cores) but hold more memory.
SCORE_CHUNK_TOKENS = 64


class AdapterError(Exception):
    """A LoRA adapter file cannot be loaded or does not fit the base model."""


class LlamaCppBackend:
    name = "llama_cpp"

    def __init__(self, model_path: Path, n_ctx: int = 2048, threads: int = 2, seed: int = 0):
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
        self._adapters: dict[Path, ctypes.c_void_p] = {}  # loaded adapter handles by path
        self._active: tuple[ActiveAdapter, ...] = ()

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
        adapters = tuple(adapters)
        if adapters == self._active:
            return
        handles: list[Any] = [self._load_adapter(adapter.path) for adapter in adapters]
        count = len(handles)
        array = (self._llama_cpp.llama_adapter_lora_p_ctypes * max(count, 1))(*handles)
        scales = (ctypes.c_float * max(count, 1))(*[adapter.scale for adapter in adapters])
        code = self._llama_cpp.llama_set_adapters_lora(
            self.llm._ctx.ctx, array if count else None, count, scales if count else None
        )
        if code != 0:
            raise AdapterError(f"llama.cpp rejected the adapter set {adapters} (code {code})")
        self._active = adapters
        # Cached prompt tokens were computed with the previous adapters.
        self._reset_context()

    def memory(self) -> MemoryUsage:
        rss, peak = process_memory()
        return MemoryUsage(
            rss_bytes=rss, peak_rss_bytes=peak, model_file_bytes=self.info.size_bytes
        )

    def close(self) -> None:
        for handle in self._adapters.values():
            self._llama_cpp.llama_adapter_lora_free(handle)
        self._adapters.clear()
        self.llm.close()

    def _load_adapter(self, path: Path) -> ctypes.c_void_p:
        path = Path(path)
        if path in self._adapters:
            return self._adapters[path]
        info = inspect_gguf(path)
        if info.file_type != "adapter":
            raise AdapterError(
                f"{path} is a GGUF {info.file_type}, not a LoRA adapter (general.type=adapter)"
            )
        if info.architecture != self.info.architecture:
            raise AdapterError(
                f"adapter {path} is for architecture '{info.architecture}' but the base "
                f"{self.model_path.name} is '{self.info.architecture}'; use an adapter trained "
                "on this base"
            )
        # llama.cpp aborts the process on some mismatched adapters: check in Python first.
        from lora.gguf_adapter import AdapterFormatError, check_fits_base, read_gguf_adapter

        try:
            check_fits_base(read_gguf_adapter(path, load_tensors=False), self.info)
        except AdapterFormatError as error:
            raise AdapterError(str(error)) from error
        handle = self._llama_cpp.llama_adapter_lora_init(self.llm.model, str(path).encode())
        if not handle:
            raise AdapterError(
                f"llama.cpp could not load adapter {path} on base {self.model_path.name}; "
                "check that its tensor names and shapes match the base"
            )
        self._adapters[path] = handle
        return handle

    def _reset_context(self) -> None:
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()


def _log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) per row. exp runs in float32 (a float64 copy of 64 rows of a
    262k vocabulary costs more than the decode); the sums are taken in float64."""
    peak = logits.max(axis=1)
    shifted = np.exp(logits - peak[:, None])
    log_norm = np.log(shifted.sum(axis=1, dtype=np.float64)) + peak
    return logits[np.arange(len(targets)), targets].astype(np.float64) - log_norm
