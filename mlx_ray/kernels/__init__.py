"""Kernels: fast paths with a pure-MLX reference twin each (see README)."""
