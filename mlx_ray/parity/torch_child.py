"""``python -m mlx_ray.parity.torch_child ARGS.pkl OUT.pkl``: the parity harness's torch side, alone.

Started by ``harness._torch_in_child`` with an environment without MLX's
OpenBLAS preload (see there); reads the pickled arguments of
``harness.torch_in_process`` and writes its pickled result.
"""

import pickle
import sys
from pathlib import Path

from ..errors import MlxRayError
from .harness import torch_in_process

if __name__ == "__main__":
    args = pickle.loads(Path(sys.argv[1]).read_bytes())
    try:
        outcome = ("ok", torch_in_process(*args))
    except MlxRayError as e:  # a user error (bad --device, unloadable --hf): the parent re-raises it
        outcome = ("error", (type(e).__name__, str(e)))
    Path(sys.argv[2]).write_bytes(pickle.dumps(outcome))
