"""LoRA adapters for A3X: the GGUF+LoRA toolkit, the metadata format and training."""


class LoraError(Exception):
    """An adapter operation cannot run on its input; the message names the value and the fix."""
