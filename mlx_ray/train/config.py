"""``FinetuneConfig``: one validated config for a fine-tune, from the CLI or from Python."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mlx_ray.errors import BadRequest

DEFAULT_RESOURCES = {"gpu_apple_mps": 1.0}


class FinetuneConfig(BaseModel):
    """What ``mlx-ray finetune`` trains, where, and under which name it publishes the adapter.

    Training fields keep mlx-lm's names and defaults (``mlx_lm.lora``), except ``iters`` (600 here)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="base model: a cache name (`mlx-ray models list`) or a model directory; "
                                   "a quantized one trains QLoRA")
    data: str = Field(description="training JSONL (chat, prompt/completion or text lines)")
    valid: str | None = Field(None, description="validation JSONL (same formats); none: no validation loss")
    name: str = Field(description="the adapter's name; it is published as <base>-adapters/NAME next to the base")
    fine_tune_type: Literal["lora", "dora"] = "lora"
    rank: int = Field(8, ge=1, le=1024)
    scale: float = Field(20.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    num_layers: int = Field(16, ge=-1, description="adapt the last N transformer layers (-1: all)")
    keys: list[str] | None = Field(None, description="modules to adapt within a layer (e.g. self_attn.q_proj); "
                                                        "None: every linear layer, mlx-lm's default")
    iters: int = Field(600, ge=1)
    batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(1e-5, gt=0)
    max_seq_length: int = Field(2048, ge=8)
    grad_checkpoint: bool = False
    grad_accumulation_steps: int = Field(1, ge=1)
    mask_prompt: bool = Field(False, description="train on the answers only (the last assistant turn / completion)")
    seed: int = 0
    steps_per_report: int = Field(10, ge=1)
    steps_per_eval: int = Field(200, ge=1)
    val_batches: int = Field(25, ge=-1)
    save_every: int = Field(100, ge=1, description="checkpoint (adapter + optimizer) every N iterations")
    num_workers: int = Field(1, ge=1, le=1, description="one worker: MLX data parallelism across Macs is not "
                                                        "wired up yet")
    resources: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_RESOURCES),
                                        description="Ray resources per worker (the Mac's custom resource)")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per worker")
    max_failures: int = Field(3, ge=-1, description="worker losses to resume from (from the last checkpoint)")
    storage_path: str | None = Field(None, description="where Ray Train keeps checkpoints; on a multi-node "
                                                          "cluster a path every node shares (NFS) or a URI")
    cache_dir: str | None = Field(None, description="model cache root (default $MLX_RAY_CACHE)")
    force: bool = Field(False, description="replace an adapter of the same name")
    check_memory: bool = Field(True, description="refuse when the job does not fit the worker's free memory")
    sleep_serving: bool = Field(False, description="put the mlx-ray model replicas on the job's node to sleep "
                                                   "for the job (their KV pool and weights released) and wake "
                                                   "them afterwards, even when the job fails")

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        from mlx_ray.adapters import validate_name

        validate_name(self.name)
        if self.num_layers == 0:
            raise ValueError("num_layers must be -1 (all) or at least 1")
        return self

    @classmethod
    def parse(cls, **kw) -> FinetuneConfig:
        """Build one, turning a validation error into a one-line BadRequest naming the field."""
        try:
            return cls(**kw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "config"
            raise BadRequest(f"{where}: {first['msg']}", param=where or None) from None

    def lora_parameters(self) -> dict:
        return {"rank": self.rank, "scale": self.scale, "dropout": self.dropout, "keys": self.keys}

    def steps(self) -> tuple[int, int]:
        """(report every, checkpoint every): a checkpoint falls on a report, so reports come at a divisor."""
        import math

        save = min(self.save_every, self.iters)
        return math.gcd(self.steps_per_report, save), save
