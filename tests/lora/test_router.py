"""Routing by prompt similarity with the real MiniLM embedder and FAISS: profiles on
disk, the floor, top-k, softmax weights and the policy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lora import LoraError
from lora.dataset import Example
from lora.registry import AdapterRegistry, AdapterStatus
from lora.router import (
    LEGACY_EMBEDDER,
    PROFILE_FILE,
    PROFILE_INFO_FILE,
    PROFILE_TEXTS_FILE,
    SOURCE_TASK_BOOK,
    SOURCE_TRAINING_SET,
    Router,
    RouterSettings,
    build_profile,
    centroid,
    ensure_profile,
    read_profile,
    softmax_weights,
    training_groups,
)
from tests.lora.registry_fixtures import add_version, gate_record

GROUPS = {
    "geography": [
        [
            "Q: What is the capital of France?\nA:",
            "Q: What is the capital of Japan?\nA:",
            "Q: Which river flows through Cairo?\nA:",
        ],
        ["Paris is the capital of France.", "The Nile is the longest river in Africa."],
    ],
    "arithmetic": [
        [
            "Q: Anna has 3 apples and buys 4 more. How many apples does she have?\nA:",
            "Q: A pen costs 2 dollars. How much do 5 pens cost?\nA:",
        ],
        ["Seven plus five is twelve.", "To share 15 cookies among 5 friends, divide: 3 each."],
    ],
    "code": [
        ["Python code:\ndef square(x):\n    return x * x\n\nExplanation:"],
        ["A for loop repeats its body once for each item of a list."],
    ],
}


@pytest.fixture(scope="module")
def embedder():
    from knowledge.embed import routing_embedder

    return routing_embedder()


class RenamedEmbedder:
    """The same vectors under another identity, as after a change of embedder settings."""

    def __init__(self, embedder, identity: str):
        self.embedder, self.dimension, self.identity = embedder, embedder.dimension, identity
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        return self.embedder.encode(texts)


@pytest.fixture
def registry(tmp_path: Path, tiny_gguf: Path) -> AdapterRegistry:
    registry = AdapterRegistry(tmp_path / "adapters")
    for seed, domain in enumerate(GROUPS):
        add_version(
            registry, domain, AdapterStatus.ACCEPTED, tiny_gguf, seed, gate_record(domain, -0.2)
        )
    return registry


@pytest.fixture
def router(registry, embedder) -> Router:
    profiles = [
        build_profile(registry.serving(d), GROUPS[d], embedder, SOURCE_TRAINING_SET) for d in GROUPS
    ]
    return Router(profiles, embedder, RouterSettings(top_k=2, floor=0.3, temperature=0.05))


def test_softmax_weights_sum_to_one():
    weights = softmax_weights([0.7, 0.6], 0.05)
    assert sum(weights) == pytest.approx(1.0)
    assert weights[0] == pytest.approx(1 / (1 + math.exp(-2)))


def test_softmax_of_nothing_is_empty():
    assert softmax_weights([], 0.05) == []


def test_centroid_is_unit_mean():
    vectors = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    assert np.allclose(centroid(vectors), [math.sqrt(0.5), math.sqrt(0.5)])


def test_centroid_of_nothing_rejected():
    with pytest.raises(LoraError, match="no texts to build a routing profile"):
        centroid(np.zeros((0, 4)))


def test_prompt_routes_to_own_domain(router):
    decision = router.route("Q: What is the capital of Portugal?\nA:", "geography")
    assert decision.names[0] == "geography/v1"
    assert decision.adapters[0].similarity >= 0.3
    assert sum(decision.scales) == pytest.approx(1.0)


def test_top_weight_dominates(router):
    decision = router.route("Q: Tom has 6 pears and eats 2. How many are left?\nA:")
    assert decision.names[0] == "arithmetic/v1"
    assert decision.adapters[0].weight > 0.9


def test_unrelated_prompt_gets_base(router):
    decision = router.route("Grandma's knitting circle meets on Thursdays for tea.")
    assert decision.adapters == ()
    assert decision.nearest is not None
    assert decision.nearest.similarity < 0.3


def test_top_k_limits_adapters(registry, embedder):
    profiles = [
        build_profile(registry.serving(d), GROUPS[d], embedder, SOURCE_TRAINING_SET) for d in GROUPS
    ]
    router = Router(profiles, embedder, RouterSettings(top_k=1, floor=-1.0, temperature=0.05))
    decision = router.route("Q: What is the capital of Spain?\nA:")
    assert decision.names == ("geography/v1",)
    assert decision.scales == (1.0,)


def test_policy_skips_adapter(registry, embedder):
    profiles = [
        build_profile(registry.serving(d), GROUPS[d], embedder, SOURCE_TRAINING_SET) for d in GROUPS
    ]

    def no_geography(name: str, domain: str) -> tuple[bool, str]:
        return (name != "geography/v1", "not better than the base")

    settings = RouterSettings(top_k=2, floor=-1.0, temperature=0.05)
    router = Router(profiles, embedder, settings, no_geography)
    decision = router.route("Q: What is the capital of Spain?\nA:", "geography")
    assert "geography/v1" not in decision.names
    assert decision.skipped == (("geography/v1", "not better than the base"),)
    assert len(decision.names) == 2


def test_decision_json_names_fields(router):
    data = router.route("Q: What is the capital of Peru?\nA:", "geography").to_json()
    assert set(data) == {"adapters", "floor", "temperature", "top_k", "nearest", "skipped"}
    assert set(data["adapters"][0]) == {"name", "weight", "similarity"}
    assert json.loads(json.dumps(data)) == data


def test_router_without_profiles_gives_base(embedder):
    decision = Router([], embedder, RouterSettings()).route("anything")
    assert decision.adapters == ()
    assert decision.nearest is None


def test_profile_files_round_trip(registry, embedder):
    adapter = registry.serving("code")
    built = build_profile(adapter, GROUPS["code"], embedder, SOURCE_TRAINING_SET)
    assert (adapter.folder / PROFILE_FILE).exists()
    info = json.loads((adapter.folder / PROFILE_INFO_FILE).read_text())
    assert info == {
        "format_version": 1,
        "source": SOURCE_TRAINING_SET,
        "texts": 2,
        "embedder": "all-MiniLM-L6-v2 int8 128",
    }
    stored = json.loads((adapter.folder / PROFILE_TEXTS_FILE).read_text())
    assert stored == {"source": SOURCE_TRAINING_SET, "groups": GROUPS["code"]}
    read = read_profile(adapter, embedder)
    assert read is not None
    assert np.array_equal(read.vector, built.vector)
    assert float(np.linalg.norm(read.vector)) == pytest.approx(1.0, abs=1e-6)


def test_profile_of_other_dimension_ignored(registry, embedder):
    adapter = registry.serving("code")
    build_profile(adapter, GROUPS["code"], embedder, SOURCE_TRAINING_SET)
    wider = RenamedEmbedder(embedder, embedder.identity)
    wider.dimension = 768
    assert read_profile(adapter, wider) is None


def test_profile_of_other_embedder_rebuilt_from_stored_texts(registry, embedder):
    adapter = registry.serving("code")
    build_profile(adapter, GROUPS["code"], embedder, SOURCE_TRAINING_SET)
    other = RenamedEmbedder(embedder, "all-MiniLM-L6-v2 float32 64")
    assert read_profile(adapter, other) is None

    def fallback(domain: str) -> list[list[str]]:
        raise AssertionError("the stored texts should be used, not the task book")

    rebuilt = ensure_profile(adapter, other, fallback)
    assert rebuilt.source == SOURCE_TRAINING_SET  # still the training texts
    assert rebuilt.texts == 2
    info = json.loads((adapter.folder / PROFILE_INFO_FILE).read_text())
    assert info["embedder"] == "all-MiniLM-L6-v2 float32 64"
    calls = other.calls
    assert ensure_profile(adapter, other, fallback).source == SOURCE_TRAINING_SET
    assert other.calls == calls  # read back, not embedded again


def test_profile_without_embedder_is_legacy(registry, embedder):
    """A profile written before profile.json named its embedder was made by float32
    MiniLM at 256 word pieces. The int8 router builds it again from the task book."""
    adapter = registry.serving("code")
    build_profile(adapter, GROUPS["code"], embedder, SOURCE_TRAINING_SET)
    info_path = adapter.folder / PROFILE_INFO_FILE
    info = json.loads(info_path.read_text())
    del info["embedder"]
    info_path.write_text(json.dumps(info))
    (adapter.folder / PROFILE_TEXTS_FILE).unlink()
    assert read_profile(adapter, RenamedEmbedder(embedder, LEGACY_EMBEDDER)) is not None
    assert read_profile(adapter, embedder) is None
    profile = ensure_profile(adapter, embedder, lambda domain: GROUPS[domain])
    assert profile.source == SOURCE_TASK_BOOK


def test_unreadable_profile_texts_fall_back_to_book(registry, embedder):
    adapter = registry.serving("code")
    build_profile(adapter, GROUPS["code"], embedder, SOURCE_TRAINING_SET)
    (adapter.folder / PROFILE_TEXTS_FILE).write_text('{"groups": 3}')
    other = RenamedEmbedder(embedder, "all-MiniLM-L6-v2 float32 64")
    profile = ensure_profile(adapter, other, lambda domain: GROUPS[domain])
    assert profile.source == SOURCE_TASK_BOOK


def test_missing_profile_built_from_fallback(registry, embedder):
    adapter = registry.serving("code")
    asked: list[str] = []

    def fallback(domain: str) -> list[list[str]]:
        asked.append(domain)
        return GROUPS[domain]

    profile = ensure_profile(adapter, embedder, fallback)
    again = ensure_profile(adapter, embedder, fallback)
    assert asked == ["code"]
    assert profile.source == SOURCE_TASK_BOOK
    assert np.array_equal(again.vector, profile.vector)


def test_training_groups_split_sources():
    examples = (
        Example("Q: capital of France?\nA:", " Paris.", "answer:geo-france"),
        Example("", "Paris is the capital of France.", "corpus"),
        Example("", "  ", "corpus"),
        Example("", "Two plus two is four.", "replay:arithmetic"),
    )
    assert training_groups(examples) == [
        ["Q: capital of France?\nA:"],
        ["Paris is the capital of France."],
    ]
