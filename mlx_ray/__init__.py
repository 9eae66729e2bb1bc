"""mlx-ray: an MLX inference backend for Ray Serve."""

__version__ = "0.1.0"
