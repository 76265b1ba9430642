"""Load a GGUF model in this process and evaluate one token; exit 0 when that works.

Run as `python -m runtime.probe MODEL.gguf` by the loader, so that a llama.cpp
abort on a malformed file ends this child, not the daemon.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m runtime.probe MODEL.gguf", file=sys.stderr)
        return 2
    import llama_cpp

    try:
        llm = llama_cpp.Llama(model_path=argv[0], n_ctx=256, n_threads=1, verbose=False)
    except ValueError as error:
        print(f"load failed: {error}", file=sys.stderr)
        return 1
    tokens = llm.tokenize(b"probe", add_bos=True)
    llm.eval(tokens)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
