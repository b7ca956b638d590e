"""Weights in and out: HF safetensors folders, GGUF files and orbax checkpoints."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file and tensor,
    what was expected and what was found."""
