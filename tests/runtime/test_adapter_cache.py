"""The adapter cache of the llama.cpp backend on the tiny model: the byte budget,
LRU eviction, pinning, prefetching, freeing and reloading, and adapters applied
together against the same adapters merged into the base weights."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from bench.adapters import write_synthetic_adapter
from lora.merge import merge_adapters
from runtime.adapter_cache import AdapterBudgetError, AdapterError, read_ahead
from runtime.backend import ActiveAdapter, SamplingParams
from runtime.gguf_file import check_model_file
from runtime.llama_cpp_backend import LlamaCppBackend

TEXT = "the capital of france is paris and the river is long"
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, repeat_penalty=1.0)
# Rank 4 on q, k, v, o of both tiny blocks: 2 * (2048 + 1536 + 1536 + 2048) bytes.
ADAPTER_BYTES = 14_336
# Float32 rounding made runtime deltas and merged float32 weights differ by up
# to 1.4e-3 in a log-likelihood of about -230 on these adapters. A 0.1% error
# in one scale moves it by 0.02.
LOG_LIKELIHOOD_TOLERANCE = 5e-3


@pytest.fixture(scope="module")
def adapters(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("cache-adapters")
    base = check_model_file(tiny_gguf)
    return [
        write_synthetic_adapter(folder / f"a{index}.gguf", base, rank=4, seed=index, b_std=0.3)
        for index in range(8)
    ]


def open_backend(tiny_gguf: Path, adapters_in_budget: float) -> LlamaCppBackend:
    budget = int(adapters_in_budget * ADAPTER_BYTES)
    return LlamaCppBackend(tiny_gguf, n_ctx=512, threads=1, adapter_budget_bytes=budget)


def use(*paths: Path, scale: float = 1.0) -> list[ActiveAdapter]:
    return [ActiveAdapter(path, scale) for path in paths]


def resident(backend: LlamaCppBackend) -> list[str]:
    return [entry.path.name for entry in backend.adapter_cache.entries()]


def test_adapter_bytes_from_tensor_table(tiny_gguf, adapters):
    backend = open_backend(tiny_gguf, 3)
    try:
        backend.set_adapters(use(adapters[0]))
        assert backend.adapter_cache.resident_bytes == ADAPTER_BYTES
    finally:
        backend.close()


def test_budget_never_exceeded_random_sequence(tiny_gguf, adapters, monkeypatch):
    backend = open_backend(tiny_gguf, 3.5)
    cache = backend.adapter_cache
    loads: list[int] = []
    original_load = cache._load

    def checked_load(path: Path):
        # Called after eviction and before llama.cpp allocates: room must exist now.
        loads.append(cache.resident_bytes)
        assert cache.resident_bytes + ADAPTER_BYTES <= cache.budget_bytes
        return original_load(path)

    monkeypatch.setattr(cache, "_load", checked_load)
    rng = np.random.default_rng(7)
    try:
        for _ in range(150):
            chosen = rng.choice(len(adapters), size=int(rng.integers(1, 4)), replace=False)
            paths = [adapters[i] for i in chosen]
            if rng.random() < 0.25:
                cache.prefetch(paths)
            else:
                backend.set_adapters(use(*paths, scale=float(rng.uniform(-1, 1))))
            assert cache.resident_bytes <= cache.budget_bytes
        assert len(loads) > 20  # the sequence really paged adapters in and out
    finally:
        backend.close()


def test_eviction_follows_lru_order(tiny_gguf, adapters):
    backend = open_backend(tiny_gguf, 3)
    a, b, c, d = adapters[:4]
    try:
        backend.adapter_cache.prefetch([a, b, c])
        backend.set_adapters(use(a))  # a becomes the most recently used
        backend.set_adapters([])
        backend.adapter_cache.prefetch([d])
        assert resident(backend) == ["a2.gguf", "a0.gguf", "a3.gguf"]
    finally:
        backend.close()


def test_pinned_adapter_never_evicted(tiny_gguf, adapters):
    backend = open_backend(tiny_gguf, 3)
    try:
        backend.adapter_cache.pin(adapters[0])
        for path in adapters[1:]:
            backend.set_adapters(use(path))
            assert backend.adapter_cache.is_resident(adapters[0])
        backend.adapter_cache.prefetch(adapters[1:4])
        assert backend.adapter_cache.is_resident(adapters[0])
        with pytest.raises(AdapterError, match="is pinned; unpin it"):
            backend.adapter_cache.evict(adapters[0])
    finally:
        backend.close()


def test_active_adapters_never_evicted(tiny_gguf, adapters):
    backend = open_backend(tiny_gguf, 3)
    a, b, c, d = adapters[:4]
    try:
        backend.set_adapters(use(a, b))
        loaded = backend.adapter_cache.prefetch([c, d])
        assert loaded == [c]  # one free slot beside the active pair; d is skipped
        assert backend.adapter_cache.is_resident(a)
        assert backend.adapter_cache.is_resident(b)
        with pytest.raises(AdapterError, match="is active and cannot be evicted"):
            backend.adapter_cache.evict(a)
    finally:
        backend.close()


def test_prefetch_loads_without_activating(tiny_gguf, adapters):
    backend = open_backend(tiny_gguf, 3)
    try:
        base = backend.log_likelihood(TEXT).total
        loaded = backend.adapter_cache.prefetch([adapters[0], adapters[1]])
        assert loaded == [adapters[0], adapters[1]]
        assert backend.adapter_cache.active == ()
        assert backend.log_likelihood(TEXT).total == base
    finally:
        backend.close()


def test_eviction_frees_and_reload_matches(tiny_gguf, adapters, monkeypatch):
    backend = open_backend(tiny_gguf, 1)
    cache = backend.adapter_cache
    freed: list[object] = []
    original_free = cache._free
    monkeypatch.setattr(
        cache, "_free", lambda handle: (freed.append(handle), original_free(handle))
    )
    try:
        backend.set_adapters(use(adapters[0]))
        first = backend.log_likelihood(TEXT).total
        handle = cache.entries()[0].handle
        backend.set_adapters(use(adapters[1]))  # a budget of one adapter evicts the first
        assert not cache.is_resident(adapters[0])
        assert freed == [handle]
        backend.set_adapters(use(adapters[0]))
        assert backend.log_likelihood(TEXT).total == first
    finally:
        backend.close()


def test_switch_evicts_previous_active_set(tiny_gguf, adapters):
    backend = open_backend(tiny_gguf, 2)
    reference = open_backend(tiny_gguf, 2)
    try:
        backend.set_adapters(use(adapters[0], adapters[1]))
        backend.set_adapters(use(adapters[2], adapters[3]))
        reference.set_adapters(use(adapters[2], adapters[3]))
        assert resident(backend) == ["a2.gguf", "a3.gguf"]
        assert backend.log_likelihood(TEXT).total == reference.log_likelihood(TEXT).total
    finally:
        backend.close()
        reference.close()


def test_active_set_over_budget_rejected(tiny_gguf, adapters):
    backend = open_backend(tiny_gguf, 2.5)
    try:
        backend.set_adapters(use(adapters[0]))
        before = backend.log_likelihood(TEXT).total
        with pytest.raises(AdapterBudgetError) as raised:
            backend.set_adapters(use(*adapters[1:4]))
        message = str(raised.value)
        assert "needs 43,008 bytes" in message
        assert "a1.gguf 14,336 bytes" in message
        assert "adapter budget is 35,840 bytes" in message
        assert backend.adapter_cache.active == (adapters[0],)
        assert backend.log_likelihood(TEXT).total == before
    finally:
        backend.close()


def test_pinned_bytes_count_against_active_set(tiny_gguf, adapters):
    backend = open_backend(tiny_gguf, 2)
    try:
        backend.adapter_cache.pin(adapters[0])
        with pytest.raises(AdapterBudgetError, match="pinned adapters hold 14,336 bytes"):
            backend.set_adapters(use(adapters[1], adapters[2]))
    finally:
        backend.close()


def test_switch_never_reuses_cached_prompt(tiny_gguf, adapters):
    backend = open_backend(tiny_gguf, 3)
    prompt = "the capital of france is"
    try:
        expected = {}
        for scale in (1.0, 0.4):
            fresh = open_backend(tiny_gguf, 3)
            fresh.set_adapters(use(adapters[1], scale=scale))
            expected[scale] = fresh.generate(prompt, GREEDY).text
            fresh.close()
        backend.set_adapters(use(adapters[0]))
        backend.generate(prompt, GREEDY)  # leaves the prompt in the KV cache
        backend.set_adapters(use(adapters[1]))
        assert backend.generate(prompt, GREEDY).text == expected[1.0]
        backend.set_adapters(use(adapters[1], scale=0.4))  # only the scale changes
        assert backend.generate(prompt, GREEDY).text == expected[0.4]
        assert expected[1.0] != expected[0.4]
    finally:
        backend.close()


def test_changed_file_is_reloaded(tiny_gguf, adapters, tmp_path):
    base = check_model_file(tiny_gguf)
    path = write_synthetic_adapter(tmp_path / "domain.gguf", base, rank=4, seed=20, b_std=0.3)
    backend = open_backend(tiny_gguf, 3)
    try:
        backend.set_adapters(use(path))
        old = backend.log_likelihood(TEXT).total
        backend.set_adapters([])
        write_synthetic_adapter(path, base, rank=4, seed=21, b_std=0.3)
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        backend.set_adapters(use(path))
        new = backend.log_likelihood(TEXT).total
    finally:
        backend.close()
    assert new != pytest.approx(old, abs=1e-3)


@pytest.mark.parametrize("scales", [(0.8, -0.5), (1.0, 0.6, -0.9)])
def test_adapters_together_match_merged_weights(tiny_gguf, adapters, tmp_path, scales):
    specs = [ActiveAdapter(adapters[i], s) for i, s in enumerate(scales)]
    merged_path = tmp_path / "merged.gguf"
    merge_adapters(tiny_gguf, specs, merged_path, outtype="f32")
    backend = open_backend(tiny_gguf, len(scales))
    merged = LlamaCppBackend(merged_path, n_ctx=512, threads=1)
    try:
        backend.set_adapters(specs)
        expected = merged.log_likelihood(TEXT).total
        assert backend.log_likelihood(TEXT).total == pytest.approx(
            expected, abs=LOG_LIKELIHOOD_TOLERANCE
        )
        # Paged out and back in, the set gives the same result.
        backend.set_adapters(use(*adapters[4 : 4 + len(scales)]))
        backend.set_adapters(specs)
        assert backend.log_likelihood(TEXT).total == pytest.approx(
            expected, abs=LOG_LIKELIHOOD_TOLERANCE
        )
    finally:
        backend.close()
        merged.close()


def test_duplicate_adapter_scales_add(tiny_gguf, adapters):
    backend = open_backend(tiny_gguf, 2)
    try:
        backend.set_adapters([ActiveAdapter(adapters[0], 0.25), ActiveAdapter(adapters[0], 0.5)])
        doubled = backend.log_likelihood(TEXT).total
        backend.set_adapters([ActiveAdapter(adapters[0], 0.75)])
        assert doubled == pytest.approx(backend.log_likelihood(TEXT).total, abs=1e-6)
    finally:
        backend.close()


def test_reload_skips_validation_of_unchanged_file(tiny_gguf, adapters, tmp_path, monkeypatch):
    base = check_model_file(tiny_gguf)
    path = write_synthetic_adapter(tmp_path / "domain.gguf", base, rank=4, seed=22, b_std=0.3)
    backend = open_backend(tiny_gguf, 1)
    cache = backend.adapter_cache
    inspected: list[Path] = []
    original_inspect = cache._inspect
    monkeypatch.setattr(cache, "_inspect", lambda p: (inspected.append(p), original_inspect(p))[1])
    try:
        backend.set_adapters(use(path))
        backend.set_adapters(use(adapters[0]))  # evicts the first file
        backend.set_adapters(use(path))
        assert inspected == [path, adapters[0]]
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        backend.set_adapters(use(adapters[0]))
        backend.set_adapters(use(path))
        assert inspected == [path, adapters[0], path]
    finally:
        backend.close()


def in_page_cache(path: Path) -> bool:
    """Tell whether the file's first page is in the page cache: a read with RWF_NOWAIT
    fails with EAGAIN instead of waiting for the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.preadv(descriptor, [bytearray(4096)], 0, os.RWF_NOWAIT)
    except BlockingIOError:
        return False
    finally:
        os.close(descriptor)
    return True


def drop_from_page_cache(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # dirty pages are not dropped
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def test_prefetch_reads_ahead_what_does_not_fit(tiny_gguf, adapters, tmp_path):
    """The budget fits one adapter: the second is not loaded, but its file is read
    into the page cache, so that loading it later does not wait for the disk."""
    first, second = tmp_path / "first.gguf", tmp_path / "second.gguf"
    first.write_bytes(adapters[0].read_bytes())
    second.write_bytes(adapters[1].read_bytes())
    drop_from_page_cache(second)
    if in_page_cache(second):
        pytest.skip("this file system keeps the file cached after POSIX_FADV_DONTNEED")
    backend = open_backend(tiny_gguf, 1)
    try:
        assert backend.prefetch_adapters(use(first, second)) == [first]
        assert not backend.adapter_cache.is_resident(second)
        for _ in range(200):  # the read-ahead runs in the background
            if in_page_cache(second):
                break
            time.sleep(0.01)
        assert in_page_cache(second)
    finally:
        backend.close()


def test_prefetch_skips_an_invalid_file(tiny_gguf, adapters, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 60)
    backend = open_backend(tiny_gguf, 3)
    try:
        assert backend.prefetch_adapters(use(broken, adapters[0])) == [adapters[0]]
        with pytest.raises(AdapterError, match="broken.gguf"):
            backend.adapter_cache.prefetch([broken])
        with pytest.raises(AdapterError, match="broken.gguf"):
            backend.set_adapters(use(broken))
        assert backend.adapter_cache.is_resident(adapters[0])
    finally:
        backend.close()


def test_read_ahead_of_a_missing_file_is_false(tmp_path):
    assert read_ahead(tmp_path / "gone.gguf") is False


def test_pin_adapters_replaces_the_pinned_set(tiny_gguf, adapters, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    backend = open_backend(tiny_gguf, 1)
    try:
        # The budget fits one adapter: the second pin does not fit, the broken one fails.
        assert backend.pin_adapters(use(adapters[0], adapters[1], broken)) == [adapters[0]]
        assert backend.pin_adapters(use(adapters[1])) == [adapters[1]]
        assert [e.path for e in backend.adapter_cache.entries() if e.pinned] == [adapters[1]]
        assert backend.pin_adapters([]) == []
        assert not any(e.pinned for e in backend.adapter_cache.entries())
    finally:
        backend.close()
