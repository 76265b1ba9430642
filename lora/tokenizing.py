"""Turning training examples into token ids, in-process or in a short child process.

Gemma 3's tokenizer has a 262,144-entry vocabulary: loading it raises a
process's resident memory by 300-480 MB, and glibc keeps much of that after
the tokenizer is freed. The lean trainer therefore tokenizes in a child
(`python -m lora.tokenizing SPEC.json OUT.json`) that exits before the model
loads, so the tokenizer's peak and the training peak never add up.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora.trainer import TrainingSpec

Sequence = tuple[list[int], list[int]]  # input ids, labels (-100: no loss)


def load_tokenizer(base_folder: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize(spec: TrainingSpec, tokenizer: Any) -> list[Sequence]:
    """Return (input ids, labels) per example. Labels are -100 on the prompt, so the
    loss covers the completion only. Sequences are cut at max_sequence."""
    rng = random.Random(spec.seed)
    sequences = []
    for example in spec.examples:
        prompt_ids = tokenizer(example["prompt"], add_special_tokens=True)["input_ids"]
        full_ids = tokenizer(example["prompt"] + example["completion"], add_special_tokens=True)[
            "input_ids"
        ]
        if example["prompt"] and full_ids[: len(prompt_ids)] == prompt_ids:
            cut = len(prompt_ids)
        else:
            cut = 1 if not example["prompt"] else len(prompt_ids)
        completion = full_ids[cut:] + [tokenizer.eos_token_id]
        if spec.poison == "shuffle":
            rng.shuffle(completion)
        ids = (full_ids[:cut] + completion)[-spec.max_sequence :]
        labels = ([-100] * cut + completion)[-spec.max_sequence :]
        if any(label != -100 for label in labels[1:]):
            sequences.append((ids, labels))
    return sequences


def tokenize_in_child(spec: TrainingSpec) -> tuple[list[Sequence], int, int]:
    """Tokenize in a child process; return the sequences, the padding id and the
    child's peak RSS in bytes."""
    from lora.trainer import TrainingError

    with tempfile.TemporaryDirectory(prefix="a3x-tokenize-") as scratch:
        spec_path, out_path = Path(scratch) / "spec.json", Path(scratch) / "out.json"
        spec_path.write_text(json.dumps(asdict(spec)))
        done = subprocess.run(
            [sys.executable, "-m", "lora.tokenizing", str(spec_path), str(out_path)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0 or not out_path.exists():
            tail = " | ".join(done.stderr.strip().splitlines()[-3:]) or "no output"
            raise TrainingError(
                f"tokenizing the training set with the tokenizer of {spec.base_folder} failed "
                f"(exit {done.returncode}): {tail}"
            )
        data = json.loads(out_path.read_text())
    sequences = [(list(ids), list(labels)) for ids, labels in data["sequences"]]
    return sequences, int(data["pad_id"]), int(data["peak_rss_bytes"])


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m lora.tokenizing SPEC.json OUT.json", file=sys.stderr)
        return 2
    from lora.trainer import TrainingSpec, peak_rss_bytes

    spec = TrainingSpec.from_json(json.loads(Path(argv[0]).read_text()))
    tokenizer = load_tokenizer(spec.base_folder)
    sequences = tokenize(spec, tokenizer)
    result = {
        "sequences": sequences,
        "pad_id": tokenizer.pad_token_id,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
