"""Benchmarks: MLX against PyTorch on one model (``mlx-ray bench``), and a load
generator for any OpenAI-compatible endpoint (``mlx-ray bench serve``)."""
