"""LoRA adapters for A3X: the GGUF+LoRA toolkit, the metadata format and training."""
