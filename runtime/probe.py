"""Load a GGUF model (and optionally a LoRA adapter on it) in this process and
evaluate one token; exit 0 when that works.

Run as `python -m runtime.probe MODEL.gguf [ADAPTER.gguf]` by the loader and by
retraining, so that a llama.cpp abort on a malformed file ends this child, not
the daemon.
"""

from __future__ import annotations

import ctypes
import sys


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print("usage: python -m runtime.probe MODEL.gguf [ADAPTER.gguf]", file=sys.stderr)
        return 2
    import llama_cpp

    try:
        llm = llama_cpp.Llama(model_path=argv[0], n_ctx=256, n_threads=1, verbose=False)
    except ValueError as error:
        print(f"load failed: {error}", file=sys.stderr)
        return 1
    if len(argv) == 2:
        adapter = llama_cpp.llama_adapter_lora_init(llm.model, argv[1].encode())
        if not adapter:
            print(f"adapter load failed: {argv[1]}", file=sys.stderr)
            return 1
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(1.0)
        llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, adapters, 1, scales)
    tokens = llm.tokenize(b"probe", add_bos=True)
    llm.eval(tokens)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
