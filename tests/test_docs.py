"""The README's examples say what the code does: a printed block is what the command prints."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_printed_serve_config_block_is_what_serve_print_config_prints():
    text = README.read_text()
    cmd_block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "--print-config --env-vars" in b)
    line = " ".join(ln.rstrip("\\").strip() for ln in cmd_block.splitlines()
                     if ln.startswith("mlx-ray serve") or ln.startswith("  --"))
    args = shlex.split(line)
    assert args[:2] == ["mlx-ray", "serve"], args
    printed_yaml = re.search(r"```yaml\n(applications:.*?)```", text[text.index(cmd_block):], re.S).group(1)
    out = subprocess.run([sys.executable, "-m", "mlx_ray.cli", *args[1:]], capture_output=True, text=True,
                         timeout=60, cwd=README.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    got = yaml.safe_load(out.stdout)
    for dep in got["applications"][0]["deployments"]:  # the README says Linux adds OpenBLAS's preload here
        env = dep["ray_actor_options"].pop("runtime_env", None)
        assert env in (None, {"env_vars": {"LD_PRELOAD": env and env["env_vars"]["LD_PRELOAD"]}}), env
    assert got == yaml.safe_load(printed_yaml)
