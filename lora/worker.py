"""The training child process: `python -m lora.worker SPEC.json RESULT.json`.

Training runs here and not in the daemon, so a crash or an out-of-memory kill
costs one failed round. Progress events are printed as JSON lines on stdout
for the parent; the result (or the error) is written to RESULT.json.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m lora.worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    from lora import LoraError
    from lora.trainer import TrainingSpec, train

    spec_path, result_path = Path(argv[0]), Path(argv[1])
    spec = TrainingSpec.from_json(json.loads(spec_path.read_text()))

    def emit(event: dict) -> None:
        print(json.dumps(event), flush=True)

    try:
        result = train(spec, emit)
    except LoraError as error:
        result_path.write_text(json.dumps({"error": str(error)}))
        return 1
    result_path.write_text(json.dumps({"result": asdict(result)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
