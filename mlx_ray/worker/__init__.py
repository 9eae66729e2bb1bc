"""Join this machine to a Ray cluster as a worker node.

``mlx-ray worker start`` detects the node's resources (``resources``), checks
that the head runs the same Ray and Python (``versions``), builds the exact
``ray start`` command and environment (``command``) and execs it. ``launchd``
and ``systemd`` write service definitions that run the same command at boot.
Nothing here imports MLX or Ray at import time: the CLI stays fast.
"""
