"""Checkpoint readers: GGUF today (`checkpoints.gguf`)."""
