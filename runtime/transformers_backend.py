"""The transformers backend: a GGUF file dequantized to torch, or a Hugging Face folder.

Loading a GGUF file through transformers takes one to two minutes on a small
CPU, most of it converting the tokenizer. So the dequantized weights and the
tokenizer are saved once under `cache/dequantized/<sha256>/`, and later loads
read that folder in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import torch

from runtime.backend import ActiveAdapter, Generation, LogLikelihood, MemoryUsage, SamplingParams
from runtime.gguf_file import (
    GGUFInfo,
    ModelFileError,
    check_model_file,
    inspect_gguf,
    sha256_of_file,
)
from runtime.memory import process_memory

if TYPE_CHECKING:
    from lora.layers import LayerScales

log = structlog.get_logger(__name__)

CACHE_FORMAT_VERSION = 1
SCORE_CHUNK_TOKENS = 64  # positions per lm_head call when scoring a text

# How several active adapters combine. "linear" keeps each adapter active with its
# scale, so the model adds the weighted sum of their deltas exactly, as llama.cpp
# does. The others are PEFT's `add_weighted_adapter` methods, which build one mixed
# adapter. "ties" and "dare_*" prune and merge the lora_A and lora_B factors
# separately. The "_svd" variants prune and merge the full deltas (B @ A times the
# scaling) and factor the result back by SVD, at the sum of the adapters' ranks so
# that nothing is cut.
COMBINATIONS = (
    "linear",
    "ties",
    "dare_linear",
    "dare_ties",
    "ties_svd",
    "dare_linear_svd",
    "dare_ties_svd",
)


class AdapterLoadError(Exception):
    """A PEFT adapter folder cannot be loaded on this model."""


def dequantized_folder(gguf_path: Path, cache_dir: Path, sha256: str | None = None) -> Path:
    """Return a Hugging Face folder with the GGUF file's weights and tokenizer, building it once."""
    sha256 = sha256 or sha256_of_file(gguf_path)
    folder = cache_dir / "dequantized" / sha256
    marker = folder / "a3x-cache.json"
    if marker.exists():
        stored = json.loads(marker.read_text())
        if stored.get("format_version") == CACHE_FORMAT_VERSION:
            if stored.get("source") != str(gguf_path):
                # Same content (the folder is named by its hash), new place: record it,
                # so that the lean trainer and the exporter find the file.
                stored["source"] = str(gguf_path)
                _write_atomically(marker, json.dumps(stored))
            return folder
        shutil.rmtree(folder)  # written by another A3X version; rebuild it
    check_model_file(gguf_path)
    return _build_dequantized(gguf_path, folder, sha256)


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


def _build_dequantized(gguf_path: Path, folder: Path, sha256: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log.info("model.dequantizing", path=str(gguf_path), cache=str(folder))
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        _save_model(model, staging)
        tokenizer.save_pretrained(staging)
        (staging / "a3x-cache.json").write_text(
            json.dumps(
                {"format_version": CACHE_FORMAT_VERSION, "source": str(gguf_path), "sha256": sha256}
            )
        )
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, folder)
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelFileError(
            f"transformers could not load {gguf_path} ({type(error).__name__}: {error}); "
            "use the llama_cpp backend for this file"
        ) from error
    log.info("model.dequantized", seconds=round(time.perf_counter() - started, 1))
    return folder


def _save_model(model: Any, folder: Path) -> None:
    """Save config and weights. `save_pretrained` refuses GGUF-loaded models, so the
    weights go through safetensors directly (it drops tied duplicates)."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


class TransformersBackend:
    name = "transformers"

    def __init__(
        self,
        model_path: Path,
        cache_dir: Path,
        sha256: str | None = None,
        threads: int = 2,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        combination: str = "linear",
        density: float = 0.5,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _check_combination(combination, density)
        self.combination = combination  # default for set_adapters
        self.density = density  # share of values that ties and dare keep
        self.model_path = Path(model_path)
        torch.set_num_threads(threads)
        self.seed = seed
        if self.model_path.is_dir():
            folder = self.model_path
        else:
            folder = dequantized_folder(self.model_path, cache_dir, sha256)
        self.folder = folder
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.base_model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        self.base_model.eval()
        self.model: Any = self.base_model  # a PeftModel once an adapter is loaded
        self._base_scaling: dict[str, dict[str, float]] = {}  # module -> adapter -> scaling
        self._loaded: dict[Path, str] = {}  # adapter folder -> adapter_name
        self._active: tuple[Any, ...] = ()  # (adapters, combination, density) now applied
        self._mixed: tuple[Any, ...] | None = None  # (key, adapter_name) of the mixed adapter
        self._mixes = 0  # mixed adapters made so far, for unique names
        self._info: GGUFInfo | None = None  # the model file's header, once needed

    @torch.inference_mode()
    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        started = time.perf_counter()
        inputs = self.tokenizer(prompt, return_tensors="pt")
        prompt_tokens = int(inputs["input_ids"].shape[1])
        sampling: dict[str, Any] = {"do_sample": params.temperature > 0}
        if params.temperature > 0:
            sampling.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        if params.stop:
            sampling["stopping_criteria"] = [
                _StopOnText(self.tokenizer, prompt_tokens, params.stop)
            ]
        torch.manual_seed(self.seed if params.seed is None else params.seed)
        output = self.model.generate(
            **inputs,
            max_new_tokens=params.max_tokens,
            repetition_penalty=params.repeat_penalty,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            **sampling,
        )
        new_tokens = output[0, prompt_tokens:]
        text = str(self.tokenizer.decode(new_tokens, skip_special_tokens=True))
        text, stopped = _cut_at_stop(text, params.stop)
        ended = bool(len(new_tokens)) and int(new_tokens[-1]) == self.tokenizer.eos_token_id
        finish = "stop" if stopped or ended or len(new_tokens) < params.max_tokens else "length"
        return Generation(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=int(len(new_tokens)),
            wall_seconds=time.perf_counter() - started,
            finish_reason=finish,
        )

    @torch.inference_mode()
    def log_likelihood(self, text: str) -> LogLikelihood:
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        if ids.shape[1] < 2:
            return LogLikelihood(total=0.0, tokens=0)
        # Logits over a 262k vocabulary are large, so the head runs on slices.
        hidden = self.model.get_decoder()(input_ids=ids).last_hidden_state[0]
        head = self.model.get_output_embeddings()
        softcap = getattr(self.base_model.config, "final_logit_softcapping", None)
        total = 0.0
        for start in range(0, ids.shape[1] - 1, SCORE_CHUNK_TOKENS):
            stop = min(start + SCORE_CHUNK_TOKENS, ids.shape[1] - 1)
            logits = head(hidden[start:stop]).double()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            targets = ids[0, start + 1 : stop + 1]
            log_probs = torch.log_softmax(logits, dim=-1)
            total += float(log_probs[torch.arange(len(targets)), targets].sum())
        return LogLikelihood(total=total, tokens=int(ids.shape[1] - 1))

    def set_adapters(
        self,
        adapters: Sequence[ActiveAdapter],
        combination: str | None = None,
        density: float | None = None,
    ) -> None:
        """Apply `adapters`, each with its scale (negative subtracts it), combined by
        `combination` (default: the backend's); one adapter is always linear."""
        combination = combination or self.combination
        density = self.density if density is None else density
        _check_combination(combination, density)
        adapters = tuple(adapters)
        if len(adapters) <= 1:
            combination = "linear"
        key = (adapters, combination, density)
        if key == self._active:
            return
        if not adapters:
            if self.model is not self.base_model:
                self.model.base_model.disable_adapter_layers()
            self._active = ()
            return
        layered = [adapter for adapter in adapters if adapter.layers is not None]
        if layered and combination != "linear":
            raise AdapterLoadError(
                f"per-layer scales of {layered[0].path} need the linear combination, not "
                f'{combination}; set routing.combination = "linear" or drop the layer scales'
            )
        names = [self._load_adapter(adapter) for adapter in adapters]
        self.model.base_model.enable_adapter_layers()
        if combination == "linear":
            unique = list(dict.fromkeys(names))
            self.model.base_model.set_adapter(unique if len(unique) > 1 else unique[0])
            self._apply_scales(self._scale_rules(names, adapters))
        else:
            scales = [adapter.scale for adapter in adapters]
            self.model.base_model.set_adapter(self._mix(names, scales, combination, density))
        self._active = key

    def _mix(self, names: list[str], weights: list[float], combination: str, density: float) -> str:
        """Build (or reuse) the mixed adapter of `names` with PEFT and return its name.
        Only the newest mixed adapter is kept, since each is a full set of factors."""
        key = (tuple(names), tuple(weights), combination, density)
        if self._mixed is not None and self._mixed[0] == key:
            return str(self._mixed[1])
        # add_weighted_adapter multiplies each source by its scaling, which must be
        # the adapter's own (alpha / r), not a scale left from a linear set.
        self._apply_scales({name: [(1.0, None)] for name in names})
        mixed = f"mixed_{self._mixes}"
        self._mixes += 1
        options: dict[str, Any] = {"combination_type": combination, "density": density}
        if combination.endswith("_svd"):
            options["svd_rank"] = sum(self.model.peft_config[name].r for name in names)
        torch.manual_seed(self.seed)  # dare prunes at random
        try:
            self.model.add_weighted_adapter(names, weights, mixed, **options)
        except ValueError as error:
            raise AdapterLoadError(
                f"PEFT could not combine adapters {', '.join(names)} by {combination}: {error}; "
                "the ties and dare methods need adapters of one rank, the _svd ones do not"
            ) from error
        self._set_mixed_scaling(mixed)
        self.model.eval()
        if self._mixed is not None:
            self.model.base_model.set_adapter(mixed)  # so that the new one stays active
            self.model.delete_adapter(self._mixed[1])
        self._mixed = (key, mixed)
        return mixed

    def _set_mixed_scaling(self, mixed: str) -> None:
        """Apply a mixed adapter at scaling 1, because its factors already carry the
        weights and each source's scaling. PEFT 0.21 gives the mixed adapter
        lora_alpha = r, which is scaling 1 except for rsLoRA configs (alpha / sqrt(r))."""
        for module in self.model.modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict) and mixed in scaling:
                scaling[mixed] = 1.0

    def prefetch_adapters(self, adapters: Sequence[ActiveAdapter]) -> list[Path]:
        """Load the PEFT adapters without changing which are applied. This backend
        keeps every loaded adapter, so it has no budget to stay within."""
        loaded = []
        for adapter in adapters:
            try:
                self._load_adapter(adapter)
            except AdapterLoadError as error:
                log.warning("adapters.prefetch_invalid", path=str(adapter.path), error=str(error))
                continue
            loaded.append(Path(adapter.path))
        # PeftModel.from_pretrained applies the first adapter it loads: apply the
        # previous set again. Per-layer scales need no preparation in this backend.
        active, self._active = self._active, ("prefetched",)
        if active:
            self.set_adapters(*active)
        else:
            self.set_adapters([])
        return loaded

    def pin_adapters(self, adapters: Sequence[ActiveAdapter]) -> list[Path]:
        """Load the adapters. This backend never frees a loaded adapter, so each one
        stays loaded as if pinned."""
        return self.prefetch_adapters(adapters)

    def memory(self) -> MemoryUsage:
        rss, peak = process_memory()
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        size = self.model_path.stat().st_size if self.model_path.is_file() else weights
        return MemoryUsage(rss, peak, size, details={"parameter_bytes": weights})

    def close(self) -> None:
        self.model = None
        self.base_model = None

    def _load_adapter(self, adapter: ActiveAdapter) -> str:
        from peft import PeftModel

        path = Path(adapter.path)
        if path in self._loaded:
            return self._loaded[path]
        if not (path / "adapter_config.json").exists():
            raise AdapterLoadError(
                f"{path} is not a PEFT adapter folder (no adapter_config.json); the transformers "
                "backend loads PEFT folders, the llama_cpp backend loads GGUF adapters"
            )
        name = f"a{len(self._loaded)}_{adapter.adapter_name}".replace(".", "_")
        try:
            if self.model is self.base_model:
                self.model = PeftModel.from_pretrained(self.base_model, path, adapter_name=name)
            else:
                self.model.load_adapter(path, adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as error:
            raise AdapterLoadError(
                f"PEFT could not load adapter {path} on {self.model_path}: {error}"
            ) from error
        self.model.eval()
        self._record_base_scaling(name)
        self._loaded[path] = name
        return name

    def _record_base_scaling(self, name: str) -> None:
        for module_name, module in self.model.named_modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict) and name in scaling:
                self._base_scaling.setdefault(module_name, {})[name] = float(scaling[name])

    def _apply_scales(self, rules: dict[str, list[tuple[float, dict[str, float] | None]]]) -> None:
        """Set each LoRA module's scaling per adapter name to its own scaling times the
        sum over `rules[name]` of scale x the module's per-layer factor (1 without)."""
        for module_name, module in self.model.named_modules():
            base = self._base_scaling.get(module_name)
            if not base:
                continue
            for name, terms in rules.items():
                if name in base:
                    total = sum(
                        scale * (1.0 if factors is None else factors[module_name])
                        for scale, factors in terms
                    )
                    module.scaling[name] = base[name] * total

    def _scale_rules(
        self, names: list[str], adapters: Sequence[ActiveAdapter]
    ) -> dict[str, list[tuple[float, dict[str, float] | None]]]:
        """Return, per adapter name, its (scale, factor per module) terms. An adapter
        listed twice is applied with the sum, as llama.cpp applies it."""
        rules: dict[str, list[tuple[float, dict[str, float] | None]]] = {}
        for name, adapter in zip(names, adapters, strict=True):
            factors = None
            if adapter.layers is not None:
                factors = self._layer_factors(name, adapter.path, adapter.layers)
            rules.setdefault(name, []).append((adapter.scale, factors))
        return rules

    def _gguf_info(self) -> GGUFInfo:
        """Return the GGUF header of the model file, read once (every switch to an
        adapter with per-layer scales needs its architecture and block count)."""
        if self._info is None:
            self._info = inspect_gguf(self.model_path)
        return self._info

    def _layer_factors(self, name: str, source: Path, scales: LayerScales) -> dict[str, float]:
        """Return the per-layer factor of each module the adapter `name` modifies, by
        the GGUF names that lora/layers.py's protocol uses."""
        from lora.layers import LayerScalesError, target_factors
        from lora.names import HF_BLOCK_PREFIX, NameMapError, gguf_name_of_module

        if self.model_path.is_dir():
            raise AdapterLoadError(
                f"per-layer scales of {source} name GGUF tensors, so they need a GGUF "
                f"model path; {self.model_path} is a folder"
            )
        info = self._gguf_info()
        blocks = info.block_count or 0
        modules = [m for m, scalings in self._base_scaling.items() if name in scalings]
        targets = {}
        for module in modules:
            path = module[module.rfind(HF_BLOCK_PREFIX) :]
            try:
                target = gguf_name_of_module(path, info.architecture, blocks)
            except NameMapError as error:
                raise AdapterLoadError(str(error)) from error
            if target is None:
                raise AdapterLoadError(
                    f"module {path} of {source} has no GGUF tensor in architecture "
                    f"'{info.architecture}', so per-layer scales cannot name it"
                )
            targets[module] = target
        try:
            factors = target_factors(list(targets.values()), scales, blocks, str(source))
        except LayerScalesError as error:
            raise AdapterLoadError(str(error)) from error
        return {module: factors[target] for module, target in targets.items()}


def _check_combination(combination: str, density: float) -> None:
    if combination not in COMBINATIONS:
        raise ValueError(
            f"adapter combination {combination!r} is unknown; use one of {', '.join(COMBINATIONS)}"
        )
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density {density} is outside (0, 1]; it is the share of values kept")


class _StopOnText:
    """Stop generation once the decoded completion contains a stop string.

    transformers' own `stop_strings` preprocesses the whole vocabulary on
    every call, which costs seconds with Gemma's 262k tokens.
    """

    def __init__(self, tokenizer: Any, prompt_tokens: int, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens
        self.stops = tuple(stops)

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        done = []
        for row in input_ids:
            text = self.tokenizer.decode(row[self.prompt_tokens :], skip_special_tokens=True)
            done.append(any(stop in text for stop in self.stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut text before the first stop string, as llama.cpp does."""
    positions = [text.find(stop) for stop in stops if stop in text]
    if not positions:
        return text, False
    return text[: min(positions)], True
