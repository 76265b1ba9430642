"""The adapter benchmark: a short run on the tiny model with the real MiniLM router,
its synthetic adapters and routing profiles, the router hook and the command line, and
one short run on the real default model."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.adapters import (
    BenchSettings,
    SyntheticRoutes,
    measure_route_and_activate,
    routing_texts,
    run_benchmark,
    write_synthetic_adapter,
)
from bench.routing import shipped_books
from daemon.cli import build_parser, main
from lora.gguf_adapter import check_fits_base, read_gguf_adapter
from runtime.backend import ActiveAdapter
from runtime.gguf_file import check_model_file
from runtime.llama_cpp_backend import LlamaCppBackend

TINY_ADAPTER_BYTES = 14_336  # rank 4 on q, k, v, o of the two tiny blocks, float32
TINY = BenchSettings(
    counts=(1, 5),
    rank=4,
    large_rank=8,
    samples=12,
    load_samples=4,
    decode_samples=3,
    prompts=2,
    max_tokens=4,
    rounds=1,
    n_ctx=512,
    budget_bytes=4 * TINY_ADAPTER_BYTES,
)


@pytest.fixture(scope="module")
def embedder():
    from knowledge.embed import routing_embedder

    return routing_embedder()


@pytest.fixture(scope="module")
def tiny_result(tiny_gguf: Path, embedder):
    return run_benchmark(tiny_gguf, threads=1, settings=TINY, embedder=embedder)


def test_populations_measured(tiny_result):
    one, five = tiny_result.populations
    assert (one.registered, one.resident) == (1, 1)
    assert (five.registered, five.resident) == (5, 4)  # the budget fits four
    assert len(one.activate.samples_ms) == TINY.samples
    assert len(five.load.samples_ms) == TINY.load_samples
    assert one.combine is None
    assert five.combine is not None
    assert len(five.combine.samples_ms) == TINY.samples


def test_latencies_ordered(tiny_result):
    for population in tiny_result.populations:
        assert 0 < population.activate.p50 <= population.activate.p99
        assert 0 < population.load.p50 <= population.load.p99
    assert len(tiny_result.load_large_cold.samples_ms) == TINY.load_samples
    assert len(tiny_result.load_large_parts.init.samples_ms) == TINY.load_samples
    assert len(tiny_result.decode_switch_extra.samples_ms) == TINY.decode_samples
    assert sorted(tiny_result.decode_step) == [0, 1, 3]
    assert len(tiny_result.decode_step[3].samples_ms) == TINY.decode_samples
    assert len(tiny_result.decode_step[3].cpu_samples_ms) == TINY.decode_samples
    assert tiny_result.decode_step[0].cpu_p50 > 0


def test_routing_measured_per_population(tiny_result):
    for population in tiny_result.populations:
        assert population.route is not None
        assert len(population.route.samples_ms) == TINY.samples
        assert 0 < population.route.p50 <= population.route.p99
        assert sum(population.routed_histogram().values()) == TINY.samples
        assert max(population.routed_counts) <= 2  # the default top_k
        embed = population.route_embed
        assert embed is not None
        assert len(embed.samples_ms) == TINY.samples
        # Each embedding is part of one route sample, so every percentile is lower too.
        assert embed.p99 <= population.route.p99
    five = tiny_result.populations[1]
    assert max(five.routed_counts) > 0  # some prompts route to an adapter


def test_throughput_sides_generate_alike(tiny_result):
    expected = TINY.prompts * TINY.rounds * TINY.max_tokens
    assert sorted(tiny_result.throughput) == [0, 1, 3]
    for side in tiny_result.throughput.values():
        assert side.tokens == expected  # the tiny model never ends a text early
    assert tiny_result.ratio(0) == 1.0
    assert tiny_result.step_ratio(0) == 1.0


def test_result_sizes_and_verdicts(tiny_result):
    assert tiny_result.adapter_bytes > TINY_ADAPTER_BYTES  # file: tensors plus header
    data = tiny_result.to_json()
    assert data["throughput"]["1"]["ratio"] == tiny_result.ratio(1)
    names = [verdict["measurement"] for verdict in data["verdicts"]]
    assert "activate p99 ms, 5 registered" in names
    assert "combine 3 p99 ms, 5 registered" in names
    assert "route + activate p99 ms, 1 registered" in names
    assert "route + activate p99 ms, 5 registered" in names
    assert data["populations"][1]["route"]["count"] == TINY.samples
    assert "tokens/s with 1 adapter / base, generation" in names
    assert "tokens/s with 1 adapter / base, median step" in names
    assert "tokens/s with 1 adapter / base, median step CPU time" in names


def test_synthetic_adapter_fits_base(tiny_gguf, tmp_path):
    base = check_model_file(tiny_gguf)
    path = write_synthetic_adapter(tmp_path / "a.gguf", base, rank=4, seed=0)
    adapter = read_gguf_adapter(path)
    check_fits_base(adapter, base)
    assert adapter.resident_bytes == TINY_ADAPTER_BYTES
    assert adapter.alpha == 4.0
    assert len(adapter.pairs) == 8


def test_synthetic_adapter_subsets_share_factors(tiny_gguf, tmp_path):
    base = check_model_file(tiny_gguf)
    full = read_gguf_adapter(write_synthetic_adapter(tmp_path / "f.gguf", base, 4, seed=1))
    part = read_gguf_adapter(
        write_synthetic_adapter(
            tmp_path / "p.gguf", base, 4, seed=1, modules=["attn_v"], blocks=[1]
        )
    )
    assert list(part.pairs) == ["blk.1.attn_v.weight"]
    assert (part.pairs["blk.1.attn_v.weight"].b == full.pairs["blk.1.attn_v.weight"].b).all()


def test_route_hook_times_router(tiny_gguf, tmp_path):
    base = check_model_file(tiny_gguf)
    paths = [write_synthetic_adapter(tmp_path / f"{i}.gguf", base, 4, seed=i) for i in range(2)]
    routes = {"north": [ActiveAdapter(paths[0])], "south": [ActiveAdapter(paths[1], 0.5)]}
    backend = LlamaCppBackend(tiny_gguf, n_ctx=512, threads=1)
    try:
        latency = measure_route_and_activate(backend, routes.__getitem__, ["north", "south"], 5)
        assert len(latency.samples_ms) == 5
        assert backend.adapter_cache.active == (paths[0],)  # the fifth prompt went north
    finally:
        backend.close()


def test_routing_texts_take_domains_in_turn():
    prompts, texts = routing_texts(shipped_books())
    domains = [domain for domain, _ in texts]
    assert len(prompts) == 60
    assert len(set(domains[:6])) == 6
    assert len(texts) >= 100  # enough profiles for the default 100 registered adapters
    assert len(set(text for _, text in texts)) == len(texts)


def test_synthetic_routes_reject_too_many(embedder):
    _, texts = routing_texts(shipped_books())
    with pytest.raises(ValueError, match="--no-route"):
        SyntheticRoutes(embedder, shipped_books(), len(texts) + 1)


def test_synthetic_route_maps_names_to_files(embedder, tmp_path):
    routes = SyntheticRoutes(embedder, shipped_books(), 6)
    paths = [tmp_path / f"{index}.gguf" for index in range(6)]
    route = routes.route_for(paths)
    # The first six profiles are one task prompt of each domain, so a profile's own
    # prompt routes to its adapter first.
    _, texts = routing_texts(shipped_books())
    for index, (_, text) in enumerate(texts[:6]):
        assert route(text)[0].path == paths[index], text
    assert len(route.counts) == 6  # one decision recorded per call


def test_command_line_parses_counts():
    args = build_parser().parse_args(["bench", "adapters", "--counts", "1,3", "--budget-mib", "8"])
    assert args.counts == (1, 3)
    assert args.budget_mib == 8.0
    assert args.route is True


def test_command_line_leaves_out_routing():
    args = build_parser().parse_args(["bench", "adapters", "--no-route"])
    assert args.route is False


def test_command_line_rejects_too_many_routed(capsys):
    _, texts = routing_texts(shipped_books())
    too_many = str(len(texts) + 1)
    assert main(["bench", "adapters", "--counts", f"1,{too_many}"]) == 2
    error = capsys.readouterr().err
    assert f"asks for {too_many} registered adapters" in error
    assert "--no-route" in error


@pytest.mark.parametrize("counts", ["1,x", "0,10", ""])
def test_command_line_rejects_bad_counts(counts, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "adapters", "--counts", counts])
    assert "--counts" in capsys.readouterr().err


@pytest.mark.slow
def test_short_run_on_default_model(embedder):
    from runtime.default_model import default_model_path

    settings = BenchSettings(
        counts=(3,), samples=5, load_samples=2, decode_samples=2, prompts=1, max_tokens=4, rounds=1
    )
    result = run_benchmark(default_model_path(), threads=2, settings=settings, embedder=embedder)
    # Rank 8 on q, k, v, o of 18 Gemma 3 270M blocks: 18 * 8 * (1664 + 896 + 896 + 1664) * 4.
    assert result.adapter_bytes > 2_949_120
    assert result.adapter_bytes < 2_949_120 + 64 * 1024  # plus the header
    assert 8.0e6 < result.large_adapter_bytes < 8.3e6
    assert result.populations[0].resident == 3
    assert all(side.tokens > 0 for side in result.throughput.values())
    route = result.populations[0].route
    assert route is not None
    assert len(route.samples_ms) == 5
