"""``mlx-ray worker start`` and ``mlx-ray worker install|uninstall|print [--systemd] [--user-agent]``.

``mlx-ray worker launchd install|uninstall|print`` is the same command under its older name.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import BadRequest
from .command import DEFAULT_METRICS_EXPORT_PORT

SERVICE_PATH = ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin", "/opt/homebrew/bin")


def _worker_options(p: argparse.ArgumentParser, *, for_service: bool) -> None:
    p.add_argument("--address", required=not for_service,
                   help="the head's GCS address HOST:PORT (e.g. 10.0.0.5:6379)")
    p.add_argument("--num-cpus", type=int, help="CPUs to offer (default: performance cores on Apple Silicon)")
    p.add_argument("--num-gpus", type=int, help="GPUs to offer (default: 1 with a Metal device, 0 on CPU, "
                                                "Ray's own count with CUDA)")
    p.add_argument("--resources-override", metavar="JSON",
                   help="custom resources to offer instead of the detected ones, e.g. '{\"gpu_apple_mps\": 1}' "
                        "(how tests force the Apple GPU resource where there is no Metal)")
    p.add_argument("--memory", help="Ray's logical memory for tasks/actors (bytes or 8GiB; default: Ray's "
                        "share of RAM minus the object store)")
    p.add_argument("--object-store-memory", help="Ray object store size (default: 5%% of RAM, 512 MiB-4 GiB)")
    p.add_argument("--mlx-memory-fraction", type=float, default=0.75,
                   help="share of physical memory kept out of Ray's accounting for MLX (default 0.75)")
    p.add_argument("--node-name", help="node name shown in the cluster (default: the short hostname)")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="a node label (repeatable)")
    p.add_argument("--token-file", help="file holding the cluster's Ray auth token (sets RAY_AUTH_MODE=token; "
                                        "the token never appears on a command line)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the head (default 10)")
    p.add_argument("--skip-version-check", action="store_true",
                   help="do not compare Ray/Python with the head first (ray start still refuses a mismatch)")
    p.add_argument("--metrics-export-port", type=int, default=DEFAULT_METRICS_EXPORT_PORT, metavar="PORT",
                   help=f"Ray's Prometheus metrics port on this node (default {DEFAULT_METRICS_EXPORT_PORT}, "
                        "KubeRay's; 0: a free port Ray picks, which no scrape config can name); one given to "
                        "`ray start` after `--` wins")
    p.add_argument("ray_args", nargs="*", metavar="-- RAY_START_ARGS",
                   help="extra arguments passed verbatim to `ray start` after a `--`")


def _service_options(a: argparse.ArgumentParser) -> None:
    a.add_argument("--systemd", action="store_true",
                   help="a Linux systemd unit instead of a macOS launchd job")
    a.add_argument("--user-agent", action="store_true",
                   help="a per-user job instead of a system one: a LaunchAgent in gui/<uid> (starts only after "
                        "that user logs in) or a systemd user unit; no sudo needed")
    a.add_argument("--run-as", metavar="USER",
                   help="the account a system job runs the worker as (default: the one that ran sudo); "
                        "never root")
    a.add_argument("--service-label", default=None,
                   help="launchd label (default io.ray.worker) or systemd unit name (default mlx-ray-worker)")
    a.add_argument("--path", help="where to write the file (default: /Library/LaunchDaemons/LABEL.plist or "
                                  "/etc/systemd/system/NAME.service; with --user-agent "
                                  "~/Library/LaunchAgents/LABEL.plist or ~/.config/systemd/user/NAME.service)")
    a.add_argument("--log-dir", help="launchd log directory (default /Library/Logs/mlx-ray, owned by the "
                                     "worker's account; with --user-agent ~/Library/Logs/mlx-ray)")
    a.add_argument("--no-load", action="store_true",
                   help="write and validate only; do not run launchctl/systemctl")


def _service_actions(parent: argparse.ArgumentParser, dest: str) -> None:
    actions = parent.add_subparsers(dest=dest, metavar="{install,uninstall,print}", required=True)
    for action, help_ in (("install", "write, validate and load the service (a system one needs sudo)"),
                          ("uninstall", "unload and remove the service"),
                          ("print", "show the service file without writing anything")):
        a = actions.add_parser(action, help=help_)
        _service_options(a)
        _worker_options(a, for_service=True)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="worker_command", metavar="{start,install,uninstall,print,launchd}",
                                required=True)
    start = sub.add_parser("start", help="join this machine to the cluster (with --block: and keep it there)")
    _worker_options(start, for_service=False)
    start.add_argument("--block", action="store_true",
                       help="stay in the foreground and supervise the node: rejoin after the head restarts "
                            "(under caffeinate -s on macOS)")
    start.add_argument("--no-supervise", action="store_true",
                       help="with --block: exec `ray start --block` itself, which does not rejoin a restarted head")
    start.add_argument("--dry-run", action="store_true",
                       help="print the exact command and environment (secrets masked), run nothing")
    for action, help_ in (("install", "write, validate and load a boot-time service (LaunchDaemon / systemd "
                                      "system unit; sudo) running `worker start --block`"),
                          ("uninstall", "unload and remove the service"),
                          ("print", "show the service file without writing anything")):
        a = sub.add_parser(action, help=help_)
        _service_options(a)
        _worker_options(a, for_service=True)
    svc = sub.add_parser("launchd", help="the same install/uninstall/print, under the older name")
    _service_actions(svc, "action")


def _resources(args):
    from .resources import detect

    return detect(num_cpus=args.num_cpus, num_gpus=args.num_gpus, resources_override=args.resources_override,
                  memory=args.memory, object_store_memory=args.object_store_memory,
                  mlx_memory_fraction=args.mlx_memory_fraction, node_name=args.node_name, labels=args.label)


def _warn_loose_token(token_file: str | None) -> None:
    if token_file and os.path.isfile(token_file) and os.stat(token_file).st_mode & 0o077:
        print(f"mlx-ray worker: warning: {token_file} is readable by other users; chmod 600 it", file=sys.stderr)


def start(args) -> int:
    from . import command, versions

    host, port = versions.parse_address(args.address)
    address = versions.format_address(host, port)
    res = _resources(args)
    _warn_loose_token(args.token_file)
    supervise = args.block and not args.no_supervise
    cmd = command.build(address, res, block=args.block, token_file=args.token_file, extra_args=args.ray_args,
                        caffeinate=not supervise, metrics_export_port=args.metrics_export_port)
    target = command.scrape_target(cmd, host)
    if args.dry_run:
        for note in res.notes:
            print(f"# {note}")
        print(f"# version check: skipped by --dry-run (the head is not contacted); local {versions.local_versions()}")
        if supervise:
            print("# supervised: this command runs as a child and is started again whenever the node leaves "
                  f"the cluster{' (the supervisor holds caffeinate -s)' if sys.platform == 'darwin' else ''}")
        if target:
            print(f"# Prometheus scrape target: {target}")
        print(cmd.render())
        return 0

    def check() -> None:
        if args.skip_version_check:
            return
        head = versions.head_versions(address, args.timeout, env=cmd.env)
        local = versions.local_versions()
        versions.check_versions(head, local, address)
        print(f"mlx-ray worker: head {address} runs {head}; versions match", file=sys.stderr)

    if supervise:
        from .supervise import Supervisor

        print(f"mlx-ray worker: supervising a node for {address} as {res.node_name!r}: {res.summary()}",
              file=sys.stderr)
        _print_scrape_target(target)
        caffeinate = command.CAFFEINATE if sys.platform == "darwin" else None
        return Supervisor(cmd, address, check=check, caffeinate=caffeinate).run()
    check()
    print(f"mlx-ray worker: joining {address} as {res.node_name!r}: {res.summary()}", file=sys.stderr)
    _print_scrape_target(target)
    print(f"mlx-ray worker: exec {cmd.render()}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd.argv[0], cmd.argv, cmd.env)
    return 0  # not reached


def _print_scrape_target(target: str | None) -> None:
    if target:
        from urllib.parse import urlsplit

        hostport = urlsplit(target).netloc
        print(f"mlx-ray worker: Ray's metrics (Prometheus) at {target}; the cluster's Prometheus does not scrape "
              f"this machine by itself: add a static target, e.g. scrape_configs: [{{job_name: mlx-ray-worker, "
              f"static_configs: [{{targets: ['{hostport}']}}]}}]", file=sys.stderr)
    sys.stderr.flush()


def service_argv(args) -> list[str]:
    """The `mlx-ray worker start --block ...` command a service runs, pinned to this interpreter."""
    argv = [sys.executable, "-m", "mlx_ray.cli", "worker", "start", "--address", args.address, "--block"]
    for flag in ("num_cpus", "num_gpus", "resources_override", "memory", "object_store_memory", "node_name",
                 "timeout"):
        value = getattr(args, flag)
        if value is not None and not (flag == "timeout" and value == 10.0):
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    if args.mlx_memory_fraction != 0.75:
        argv += ["--mlx-memory-fraction", str(args.mlx_memory_fraction)]
    if args.metrics_export_port != DEFAULT_METRICS_EXPORT_PORT:
        argv += ["--metrics-export-port", str(args.metrics_export_port)]
    for label in args.label or []:
        argv += ["--label", label]
    if args.token_file:
        argv += ["--token-file", str(Path(args.token_file).expanduser().resolve())]
    if args.skip_version_check:
        argv.append("--skip-version-check")
    if args.ray_args:
        argv += ["--", *args.ray_args]
    return argv


def service_env(args, *, macos: bool) -> dict[str, str]:
    """PATH and the variables the worker needs; the token only by path."""
    from .command import token_env

    path = [str(Path(sys.executable).parent), *SERVICE_PATH]
    env = {"PATH": ":".join(dict.fromkeys(path))}
    if macos:  # `worker start` sets it too; in the service file it is visible to whoever reads it
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    env.update(token_env(args.token_file))
    for key in ("MLX_RAY_CACHE", "HF_HOME"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def service(args) -> int:
    from . import launchd, servicefile, systemd, versions

    system = not args.user_agent
    if args.user_agent and args.run_as:
        raise BadRequest("--run-as is for a system service; a --user-agent job runs as the user who installs it")
    run_as = None
    if system and args.action != "uninstall":
        run_as = servicefile.resolve_user(args.run_as)
    if args.systemd:
        name = args.service_label or systemd.DEFAULT_NAME
        path = Path(args.path).expanduser() if args.path else systemd.default_path(name, system=system)
    else:
        label = args.service_label or launchd.DEFAULT_LABEL
        path = Path(args.path).expanduser() if args.path else launchd.default_path(label, daemon=system)
    if args.action == "uninstall":
        done = systemd.uninstall(path, system=system, load=not args.no_load) if args.systemd else \
            launchd.uninstall(path, label, daemon=system, load=not args.no_load)
    else:
        versions.parse_address(args.address)  # fail early on a bad (or missing) address
        argv = service_argv(args)
        if args.systemd:
            data = systemd.build(argv, service_env(args, macos=False),
                                 f"mlx-ray Ray worker joining {args.address}", run_as=run_as).encode()
        else:
            log_dir = Path(args.log_dir).expanduser() if args.log_dir else launchd.default_log_dir(daemon=system)
            data = launchd.render(launchd.build(label, argv, service_env(args, macos=True), log_dir, run_as=run_as))
        if args.action == "print":
            sys.stdout.write(data.decode())
            return 0
        done = systemd.install(path, data.decode(), system=system, load=not args.no_load) if args.systemd else \
            launchd.install(path, data, label, daemon=system, run_as=run_as, load=not args.no_load)
    for line in done:
        print(line)
    return 0


def main(args) -> int:
    if args.worker_command == "start":
        return start(args)
    if args.worker_command in ("install", "uninstall", "print"):
        args.action = args.worker_command
        return service(args)
    if args.worker_command == "launchd":
        return service(args)
    raise BadRequest(f"unknown worker command {args.worker_command!r}")
