"""The adapter store: versioned, immutable PEFT checkpoints on any fsspec filesystem."""
