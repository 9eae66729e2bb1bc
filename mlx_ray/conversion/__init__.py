"""Conversion of Hugging Face / AWQ checkpoints into MLX models on the shared cache."""
