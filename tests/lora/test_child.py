"""Training in a child process: a killed or oversized child is a recorded failure."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from lora.child import TrainingFailed, run_training_child
from lora.trainer import TrainingSpec
from runtime.transformers_backend import dequantized_folder

EXAMPLES = [{"prompt": "", "completion": "the capital of france is paris"}] * 4


@pytest.fixture(scope="module")
def base_folder(tiny_gguf: Path, model_cache: Path) -> Path:
    return dequantized_folder(tiny_gguf, model_cache)


def spec(base_folder: Path, output: Path, epochs: float = 1.0) -> TrainingSpec:
    return TrainingSpec(
        base_folder=str(base_folder),
        examples=EXAMPLES,
        output=str(output),
        rank=2,
        targets=("v_proj",),
        accumulation=1,
        epochs=epochs,
        learning_rate=1e-3,
        threads=1,
        engine="peft",  # fast to start; tests/lora/test_lean.py runs the lean one in a child
    )


def test_child_trains_and_reports(base_folder, tmp_path):
    events = []
    result = run_training_child(
        spec(base_folder, tmp_path / "out"), 4 * 2**30, on_event=events.append
    )

    assert result.steps == 4
    assert result.peak_rss_bytes > 50 * 2**20
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert any(event.get("steps") == 4 for event in events)


def test_killed_child_is_a_failure(base_folder, tmp_path):
    def kill_soon(pid: int) -> None:
        threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()

    with pytest.raises(TrainingFailed, match="killed by signal 9"):
        run_training_child(
            spec(base_folder, tmp_path / "out", epochs=10_000), 4 * 2**30, on_start=kill_soon
        )
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_child_over_budget_is_killed(base_folder, tmp_path):
    with pytest.raises(TrainingFailed, match="exceeded the memory budget") as caught:
        run_training_child(spec(base_folder, tmp_path / "out", epochs=10_000), 120 * 2**20)
    assert caught.value.peak_rss_bytes > 120 * 2**20


def test_stop_event_ends_child(base_folder, tmp_path):
    stop = threading.Event()
    threading.Timer(1.5, stop.set).start()

    with pytest.raises(TrainingFailed, match="shutting down"):
        run_training_child(spec(base_folder, tmp_path / "out", epochs=10_000), 4 * 2**30, stop)
