"""The one validated training configuration, from YAML and command-line overrides to the code.

``TrainConfig`` is saved with every checkpoint and export, so a resumed run or a served model
rebuilds exactly the same shapes. Load with :func:`load_config`::

    cfg = load_config("configs/ml-100k.yaml", ["model.embedding_dim=64", "epochs=5"])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainer.data.config import DataConfig
from trainer.model import ModelConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LossConfig(_Strict):
    """The training objective: sampled softmax (default) or the full softmax upper bound."""

    kind: Literal["sampled", "full"] = "sampled"
    num_sampled: int = Field(1024, ge=1, description="candidates sampled per step")
    sampler: Literal["log_uniform", "uniform", "unigram"] = Field(
        "log_uniform", description="unigram = training popularity ** unigram_distortion"
    )
    negatives: Literal["sampled", "in_batch", "mixed"] = Field(
        "sampled", description="in_batch/mixed use the batch's targets with logQ correction"
    )
    unigram_distortion: float = Field(0.75, ge=0.0)
    remove_accidental_hits: bool = True


class OptimConfig(_Strict):
    """Optimizers: Adam for the dense tower, a row-wise optimizer for the item tables."""

    lr: float = Field(1e-3, gt=0.0, description="dense tower learning rate (Adam)")
    weight_decay: float = Field(0.0, ge=0.0)
    embedding_optimizer: Literal["sgd", "adagrad", "adam"] = "adam"
    embedding_lr: float = Field(1e-3, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    adagrad_init: float = Field(0.1, ge=0.0, description="initial Adagrad accumulator")


class DistributedConfig(_Strict):
    """Ray settings; num_shards=1 and num_workers=1 with no address is the in-process trainer."""

    num_shards: int = Field(1, ge=1, description="embedding shard actors")
    num_workers: int = Field(1, ge=1, description="trainer workers")
    partition_strategy: Literal["mod", "div"] = "mod"
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = Field(
        2, ge=0, description="async: pulls may lag pushes by this many steps"
    )
    ray_address: str | None = Field(None, description="None: embedded local Ray; 'auto': cluster")
    use_ray: bool = Field(False, description="force Ray even with one shard and one worker")
    shard_checkpoint_every: int = Field(200, ge=1, description="steps between shard checkpoints")
    prefetch: bool = True
    shard_cpus: float = Field(0.1, gt=0.0, description="Ray CPUs reserved per shard actor")
    worker_cpus: float | None = Field(
        None, gt=0.0, description="Ray CPUs per trainer worker (None: share the rest, <= 1)"
    )
    max_restarts: int = Field(3, ge=-1, description="Ray restarts of a shard actor (-1: forever)")
    max_recoveries: int = Field(
        3, ge=0, description="rollbacks to the last checkpoint before the run gives up"
    )
    restart_timeout_s: float = Field(120.0, gt=0.0, description="wait for a shard to come back")
    collective_timeout_s: float = Field(
        300.0, gt=0.0, description="torch.distributed timeout between workers"
    )

    @property
    def uses_ray(self) -> bool:
        """Whether these settings ask for the Ray trainer (else: the in-process one)."""
        return self.num_shards > 1 or self.num_workers > 1 or self.use_ray or bool(self.ray_address)


class TrainConfig(_Strict):
    """Everything a training run needs; saved with checkpoints and exports."""

    name: str = "run"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    batch_size: int = Field(512, ge=1)
    epochs: int = Field(10, ge=1)
    epochs_from: Path | None = Field(
        None,
        description="train for the best epoch of this earlier run (its run or artifacts "
        "directory); replaces epochs (the refit recipe)",
    )
    patience: int = Field(3, ge=1, description="epochs without improvement before stopping")
    monitor: str = Field("NDCG@10", description="validation metric for early stopping")
    eval_ks: list[int] = Field(default_factory=lambda: [10, 50, 100])
    eval_users: int | None = Field(
        None, ge=1, description="validate on at most this many users (all when None)"
    )
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = Field(True, description="bf16 autocast of the tower on CUDA")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (None: default)")
    out_dir: Path = Field(Path("runs/run"), description="checkpoints and artifacts go here")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = per epoch")
    progress: bool = Field(True, description="tqdm progress bars")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        metric = self.monitor.split("@")
        ok = self.monitor == "MRR" or (
            len(metric) == 2 and metric[0] in ("HR", "NDCG") and metric[1].isdigit()
        )
        if not ok or (self.monitor != "MRR" and int(metric[1]) not in self.eval_ks):
            raise ValueError(
                f"monitor must be 'MRR' or 'HR@K'/'NDCG@K' with K in eval_ks {self.eval_ks}, "
                f"got {self.monitor!r}."
            )
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {k!r} is not a section.")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["model.hidden=[128,64]", "epochs=3"]`` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(
                f"override {item!r} must look like key.sub=value (e.g. model.embedding_dim=32)."
            )
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e)
            raise ValueError(
                f"override {item!r}: the value is not valid YAML ({problem}); quote lists "
                f"in the shell, e.g. 'model.hidden=[128, 64]'."
            ) from None
        _set_path(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or defaults when ``path`` is None), apply overrides, validate.

    Raises:
        ValueError: naming the file and every invalid field with the reason.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"config file {path} does not exist; see configs/ for examples.")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(raw).__name__}.")
    raw = _merge(raw, parse_overrides(overrides or []))
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise ValueError(f"invalid config {path or '(defaults)'}: {problems}") from None


def config_from_json(text: str) -> TrainConfig:
    """Rebuild a config saved with :meth:`TrainConfig.to_json`."""
    return TrainConfig.model_validate(json.loads(text))
