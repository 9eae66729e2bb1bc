"""Parity harness: the MLX path against the PyTorch path on the same model."""
