"""`a3x bench generate`: generation speed of the A3X runtime against raw llama-cpp-python.

Both load the same GGUF file with the same context size and thread count and
decode the same prompts greedily. The two sides alternate prompt by prompt,
and the first side swaps each round, so that machine noise hits both alike.
The result is the ratio of tokens per second (A3X / raw), not an absolute
speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runtime.backend import SamplingParams


@dataclass
class SideResult:
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class GenerateBenchmark:
    model: str
    threads: int
    prompts: int
    max_tokens: int
    rounds: int
    raw: SideResult
    a3x: SideResult
    same_text: bool
    machine: str

    @property
    def ratio(self) -> float:
        raw = self.raw.tokens_per_second
        return self.a3x.tokens_per_second / raw if raw else 0.0

    def to_json(self) -> dict:
        data = asdict(self)
        data["raw"]["tokens_per_second"] = self.raw.tokens_per_second
        data["a3x"]["tokens_per_second"] = self.a3x.tokens_per_second
        data["ratio"] = self.ratio
        return data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="GGUF file (default: the bundled Gemma 3 270M)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads for both sides (default: one per available core)",
    )
    parser.add_argument("--prompts", type=int, default=8, help="prompts from the default task book")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the prompts")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context size in tokens")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def command(args: argparse.Namespace) -> int:
    from daemon.config import ModelConfig, thread_count
    from runtime.default_model import default_model_path

    model = args.model or default_model_path()
    threads = thread_count(ModelConfig(threads=args.threads))
    result = run_benchmark(model, threads, args.prompts, args.max_tokens, args.rounds, args.n_ctx)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    print(f"model:    {result.model}")
    print(f"machine:  {result.machine}, {threads} threads")
    print(
        f"workload: {result.prompts} prompts x {result.rounds} rounds, "
        f"{result.max_tokens} tokens max, greedy"
    )
    print(
        f"raw llama-cpp-python: {result.raw.tokens} tokens in {result.raw.seconds:.2f} s, "
        f"{result.raw.tokens_per_second:.1f} tokens/s"
    )
    print(
        f"A3X runtime:          {result.a3x.tokens} tokens in {result.a3x.seconds:.2f} s, "
        f"{result.a3x.tokens_per_second:.1f} tokens/s"
    )
    print(f"ratio A3X/raw: {result.ratio:.3f}  (same text: {'yes' if result.same_text else 'no'})")
    return 0


def machine_description() -> str:
    """CPU model and architecture, for the benchmark record."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}, {cpu}".rstrip(", ")


def benchmark_prompts(count: int) -> list[str]:
    from daemon.taskbook import default_book_path, load_book

    tasks = load_book(default_book_path()).tasks
    return [task.prompt for task in tasks[:count]]


def run_benchmark(
    model: Path, threads: int, prompts: int, max_tokens: int, rounds: int, n_ctx: int = 2048
) -> GenerateBenchmark:
    import llama_cpp

    from runtime.llama_cpp_backend import LlamaCppBackend

    texts = benchmark_prompts(prompts)
    raw_model = llama_cpp.Llama(
        model_path=str(model),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        seed=0,
        verbose=False,
    )
    backend = LlamaCppBackend(model, n_ctx=n_ctx, threads=threads, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, repeat_penalty=1.0, seed=0)
    raw, a3x = SideResult(), SideResult()
    same_text = True

    def run_raw(prompt: str) -> str:
        started = time.perf_counter()
        output: Any = raw_model.create_completion(
            prompt, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0, seed=0
        )
        raw.seconds += time.perf_counter() - started
        raw.tokens += int(output["usage"]["completion_tokens"])
        return str(output["choices"][0]["text"])

    def run_a3x(prompt: str) -> str:
        started = time.perf_counter()  # timed outside, so the wrapper's overhead counts
        generation = backend.generate(prompt, params)
        a3x.seconds += time.perf_counter() - started
        a3x.tokens += generation.completion_tokens
        return generation.text

    for round_index in range(rounds):
        for prompt in texts:
            if round_index % 2 == 0:
                raw_text, a3x_text = run_raw(prompt), run_a3x(prompt)
            else:
                a3x_text, raw_text = run_a3x(prompt), run_raw(prompt)
            same_text = same_text and raw_text == a3x_text
    backend.close()
    raw_model.close()
    return GenerateBenchmark(
        model=str(model),
        threads=threads,
        prompts=len(texts),
        max_tokens=max_tokens,
        rounds=rounds,
        raw=raw,
        a3x=a3x,
        same_text=same_text,
        machine=machine_description(),
    )
