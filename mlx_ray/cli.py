"""The ``mlx-ray`` command line.

Each subcommand lives in its own module exposing ``configure_parser(parser)``
and ``main(args) -> int | None``; this file imports only the one being run, so
``mlx-ray --help`` stays fast and ``mlx-ray worker`` does not import MLX.
Errors from the taxonomy (``mlx_ray.errors``) become one line on stderr and a
non-zero exit code; nothing else here knows about them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import MlxRayError

# name -> (module, one-line help, needs MLX (so re-exec with the fast BLAS first))
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "convert": ("mlx_ray.conversion.cli", "convert HF / AWQ weights into a (quantized) MLX model on the cache", True),
    "models": ("mlx_ray.conversion.models_cli", "list, verify or remove models on the cache", False),
    "finetune": ("mlx_ray.train.cli", "fine-tune a cached model (LoRA, DoRA, QLoRA) as a Ray Train job; publish the "
                 "adapter next to its base", True),
    "generate": ("mlx_ray.engine.cli", "generate text from a model through the engine", True),
    "serve": ("mlx_ray.serve.cli", "serve models through Ray Serve with an OpenAI-compatible API", True),
    "route": ("mlx_ray.router.cli", "run the router: one model name in front of the vLLM primary and mlx-ray arms "
              "(overflow, A/B, failover)", False),
    "plan": ("mlx_ray.plan_cli", "print the memory plan for a model on this device or a profile (KV pool, fit)", False),
    "parity": ("mlx_ray.parity.cli", "compare the MLX path against the PyTorch path (logits, greedy, perplexity)", True),
    "bench": ("mlx_ray.bench.cli", "benchmark MLX against PyTorch, or load-test an OpenAI endpoint", True),
    "package": ("mlx_ray.serve.package", "write mlx-ray's code as a zip for a RayService's py_modules (stock head)", False),
    "worker": ("mlx_ray.worker.cli", "join this machine to a Ray cluster (ray start, launchd, systemd)", False),
    "kernels": ("mlx_ray.kernels_cli", "prove the kernels here: selftest (against their twins, timed) or check (emulated)",
                True),
    "doctor": ("mlx_ray.doctor", "check this machine: backends, BLAS, kernels, Ray head, model cache", False),
}

EXIT_CODES = {"invalid_request_error": 2, "context_length_exceeded": 2, "not_found_error": 3, "conflict_error": 4,
              "read_only_error": 5, "corrupt_model_error": 6, "overloaded_error": 7, "timeout_error": 8}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-ray", description="MLX inference backend for Ray Serve.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_, _) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = _top_parser()
        args, _ = parser.parse_known_args(argv)
        if args.version:
            from . import __version__
            print(f"mlx-ray {__version__}")
            return 0
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    name = argv[0]
    module_name, help_, needs_mlx = COMMANDS[name]
    if needs_mlx:
        from .blas import reexec_with_fast_blas
        reexec_with_fast_blas()
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"mlx-ray {name}", description=help_)
    module.configure_parser(parser)
    args = parser.parse_args(argv[1:])
    try:
        rc = module.main(args)
    except MlxRayError as e:
        print(f"mlx-ray {name}: error: {e}", file=sys.stderr)
        return EXIT_CODES.get(e.kind, 1)
    except KeyboardInterrupt:
        print(f"mlx-ray {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mlx-ray ... | head`: the reader left; not an error of ours
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(rc or 0)


def entry() -> None:
    """Console-script entry. After an MLX command has finished and flushed its
    output, leave with ``os._exit``: MLX's and torch's worker threads can abort
    the interpreter's teardown (seen here as exit 134/139 *after* a command had
    succeeded), which must not turn a success into a crash code. ``serve`` keeps
    the normal exit, because Ray's shutdown hooks must run."""
    import os

    argv = sys.argv[1:]
    rc = main(argv)
    if argv and argv[0] in COMMANDS and COMMANDS[argv[0]][2] and argv[0] != "serve":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
