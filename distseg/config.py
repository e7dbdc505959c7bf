"""The experiment config: typed dataclasses (the schema), loaded from YAML with dotted ``key=value`` overrides.

    cfg = load_config("configs/debug.yaml", ["optim.lr=3e-4", "data.patch_size=[32,32,32]"])

Precedence: dataclass defaults < YAML file < overrides. Unknown keys, wrong types and bad values raise
`ConfigError` naming the full dotted key and what was expected, before any distributed work starts.
`python -m distseg.config check CONFIG [key=value ...]` validates and prints the resolved config.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distseg.config_checks import check_sections
from distseg.config_files import resolve_config
from distseg.core import exit_codes
from distseg.data.config import DataConfig
from distseg.losses import LossConfig
from distseg.typed_config import ConfigError, apply_override, from_dict, to_dict

__all__ = ["ConfigError", "ExperimentConfig", "apply_override", "dump_yaml", "from_dict", "load_config",
           "make_run_dir", "to_dict", "write_resolved"]


@dataclass
class MonitorConfig:
    """What is logged and how often."""

    enabled: bool = True
    """False: every rank gets a NullMonitor (no event files)."""
    log_every: int = 10
    """Log training scalars every N optimizer steps."""
    image_every: int = 200
    """Log a GT-vs-prediction overlay every N optimizer steps (0 = never)."""

    def validate(self, prefix: str = "monitor") -> None:
        """Raise ValueError naming ``<prefix>.<field>`` for the first invalid field."""
        if not isinstance(self.enabled, bool):
            raise ValueError(f"{prefix}.enabled: expected true/false, got {self.enabled!r}")
        for key, low in (("log_every", 1), ("image_every", 0)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{prefix}.{key}: expected an integer >= {low}, got {value!r}")


@dataclass
class RunConfig:
    """Where the run writes and how it is seeded."""

    name: str = "debug"
    """Run name; everything the run writes goes to ``<output_root>/runs/<name>/``."""
    output_root: str = "outputs"
    """Root folder on shared storage (relative paths are relative to the working directory), or
    ``s3://bucket/prefix``: the run is then written to `staging_dir` and uploaded (`distseg.train.mirror`)."""
    staging_dir: str = ""
    """With an s3:// `output_root`: the local folder (node-local disk is fine) where each node writes the run before
    uploading it. Empty: ``<system temp>/distseg-runs``."""
    seed: int = 0
    """Base seed: model init, sampling and augmentation derive from (seed, global sample position)."""
    owner_only: bool = True
    """Create the run folder readable and writable by its owner only (0700). DeepSpeed unpickles checkpoint files
    on resume, so anyone who can write into the run folder can run code in the next resumed job."""


@dataclass
class ModelConfig:
    """Which registered model to build (`distseg.models.build_model`)."""

    name: str = "unet3d"
    """Registered model name (see `python -m distseg.models`)."""
    preset: str = "default"
    """Model preset: "default" (full size) or "debug" (tiny, for tests)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Model config fields to override (e.g. {deep_supervision: true}); in/out channels come from the store."""
    init_weights: str = ""
    """Optional consolidated fp32 state dict (e.g. zero_to_fp32's pytorch_model.bin) to start from; the optimizer
    state starts fresh. Empty = random init from run.seed."""
    channels_last: bool | str = "auto"
    """Run the convolutions channels-last (`distseg.models.memory_format`; training and prediction; parameters and
    checkpoints unchanged): true, false or "auto" = 3D models on the CPU, where a training step measured 1.25-1.32x
    faster (1.16-1.19x in the 2-rank trainer; 2D models measured slower there; GPUs not measured yet)."""
    compile: bool | str = False
    """Compile the model with torch.compile for training (DeepSpeed's `engine.compile`: the module is compiled in
    place, so checkpoints and state dicts are unchanged): false, true (torch's "default" mode), or a torch.compile
    mode: "reduce-overhead" (CUDA graphs), "max-autotune", "max-autotune-no-cudagraphs". The first steps pay the
    compilation (CPU: ~35-60 s for a unet3d; cached in torch's inductor cache for the next run); see
    `distseg.train.speed`."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (warm-up, then cosine or poly decay), stepped per optimizer step."""

    name: str = "adamw"
    """"adamw" or "sgd" (SGD with Nesterov momentum, nnU-Net style)."""
    lr: float = 1e-3
    """Peak learning rate (reached at the end of warm-up)."""
    weight_decay: float = 1e-4
    """Decoupled (AdamW) or L2 (SGD) weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    momentum: float = 0.99
    """SGD Nesterov momentum."""
    schedule: str = "cosine"
    """Decay after warm-up: "cosine", "poly" or "constant"."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to `lr`."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of `lr` (cosine and poly)."""
    poly_power: float = 0.9
    """Exponent of the poly decay (1 - t)^power."""
    fused: bool | str = "auto"
    """torch's fused AdamW kernel (one kernel for every parameter tensor): true, false or "auto" = on CUDA GPUs
    without optimizer offload (the fused kernel needs the parameters on the GPU)."""


@dataclass
class TrainConfig:
    """Length of training and what happens each step."""

    steps: int = 1000
    """Optimizer steps to train for (each is `grad_accum` micro-batches per rank)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    val_every: int = 250
    """Validate every this many optimizer steps and at the end (0 = never)."""
    val_mode: str = "whole"
    """"whole": segment every validation case whole with the sliding window (the code `launch/predict.py` runs), so
    "best" is best on whole cases; "crop": one centred crop per case of `data.val_patch_size` (cheaper, coarser;
    with `data.downsample` the crop is pooled for the model and scored on the stored grid, as whole cases are)."""
    val_overlap: float = 0.5
    """Sliding-window overlap of whole-case validation (0.5 as prediction; lower is faster)."""
    val_window_batch: int = 2
    """Windows per forward call in whole-case validation."""
    max_nonfinite_in_row: int = 5
    """Stop with an error after this many consecutive skipped optimizer steps (non-finite gradients or loss on
    some rank; see `distseg.train.trainer` for what is skipped)."""
    max_minutes: float | None = None
    """Wall-clock budget of training time in minutes (None = off). The run times its steps after warm-up, lays
    the LR schedule over the steps that fit (validations and checkpoints at their cadence included), stops there
    with a final checkpoint, and a resumed run spends only what is left. `steps` stays the upper bound."""
    budget_warmup_steps: int = 2
    """With `max_minutes`: the first steps of each run (re)start are not timed (start-up costs)."""
    budget_measure_steps: int = 3
    """With `max_minutes`: timed steps before the first plan (until then the schedule spans `steps`)."""
    cudnn_benchmark: bool | str = "auto"
    """Let cuDNN time its convolution algorithms for each new input shape and keep the fastest
    (`torch.backends.cudnn.benchmark`): true, false or "auto" = on with CUDA, whose training patches all have one
    shape (the tuning happens once per shape: the first steps and the first validation windows are slower)."""


@dataclass
class CheckpointConfig:
    """Checkpoints under ``<run>/checkpoints/<tag>/`` (DeepSpeed files + trainer state + COMPLETE.json)."""

    every: int = 500
    """Save every this many optimizer steps and at the end (0 = only at the end)."""
    keep_last: int = 2
    """Complete checkpoints kept besides the best one (older ones are pruned)."""
    keep_best: bool = True
    """Also keep the checkpoint with the best mean validation Dice."""
    resume: str = "auto"
    """"auto": continue from the newest COMPLETE checkpoint of this run if any; "never": refuse to start when
    the run folder already holds checkpoints (choose a new run.name)."""
    upload_nice: int = 10
    """With an s3:// `run.output_root`: niceness (0-19) of the child process that uploads each checkpoint, so that
    the upload takes only CPU the ranks and their loader workers leave idle (0 = the ranks' own priority)."""


@dataclass
class EngineConfig:
    """The DeepSpeed engine; its JSON config is derived from this and the sections above (see distseg.train.engine)."""

    preset: str = ""
    """Optional DeepSpeed JSON preset for tuning knobs: a shipped preset's name (`zero`, `zero_gpu`: the files in
    configs/deepspeed/, found wherever distseg is installed) or a path to a JSON file. Values derived from this
    config may be "auto" there and explicit values must agree with it. Empty = no preset."""
    zero_stage: int = 2
    """ZeRO stage 0-3 (0 = plain data parallel; 1 optimizer states, 2 + gradients, 3 + parameters sharded)."""
    precision: str = "bf16"
    """"bf16", "fp16" (dynamic loss scaling), "fp32", or "auto": bf16 where the hardware runs it natively (CUDA with
    bf16, CPUs with AVX512-BF16/AMX), fp16 on older CUDA GPUs, fp32 on other CPUs (an AVX2-only CPU runs bf16
    convolutions ~20x slower than fp32). The resolved value is what the run records."""
    offload_optimizer: bool = False
    """Keep optimizer states on the CPU (ZeRO-Offload; stage >= 1, AdamW uses DeepSpeedCPUAdam)."""
    offload_param: bool = False
    """Keep parameters on the CPU (ZeRO-Infinity; stage 3 only)."""


@dataclass
class DistConfig:
    """The process group (distseg.core.dist) and what happens when a rank is lost (distseg.train.lost_rank)."""

    timeout_s: float = 600.0
    """Seconds a collective (gradient reduction, the per-step stop flag, a checkpoint barrier) waits for the other
    ranks before failing. A rank that dies is noticed at once; one that hangs, after this long. The survivors then
    name the lost rank and the step and exit with status 5; rerun the command to resume. It must exceed the
    longest legitimate wait: a slow checkpoint save or a validation pass on another rank, and the conversion of a
    checkpoint to the universal format on an elastic resume."""


@dataclass
class DebugConfig:
    """Fault-injection switches for tests. Never set these in a real run."""

    inject_nan_at_step: int = -1
    """FAULT INJECTION: replace rank 0's loss with NaN at this optimizer step (-1 = off)."""
    inject_nan_times: int = 1
    """FAULT INJECTION: how many consecutive micro-batches get the NaN loss."""


@dataclass
class ExperimentConfig:
    """One experiment: every section of the YAML file."""

    run: RunConfig = field(default_factory=RunConfig)
    """Run name, output folder and seed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    data: DataConfig = field(default_factory=DataConfig)
    """The store and how batches are drawn (distseg.data.config)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The training loss (distseg.losses)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, accumulation, clipping, validation cadence."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence, retention and resume policy."""
    deepspeed: EngineConfig = field(default_factory=EngineConfig)
    """ZeRO stage, precision, offload, optional JSON preset."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Process group timeout (lost ranks)."""
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    """TensorBoard logging (distseg.train.monitor)."""
    debug: DebugConfig = field(default_factory=DebugConfig)
    """Fault injection for tests."""

    @property
    def run_dir(self) -> Path:
        """The folder the run writes to: ``<output_root>/runs/<name>``, or its local staging copy when
        `run.output_root` is an s3:// URL (see `run_url`)."""
        if self.run_url is not None:
            staging = self.run.staging_dir or str(Path(tempfile.gettempdir()) / "distseg-runs")
            return Path(staging).expanduser().resolve() / "runs" / self.run.name
        return Path(self.run.output_root) / "runs" / self.run.name

    @property
    def run_url(self) -> str | None:
        """``<output_root>/runs/<name>`` when `run.output_root` is an s3:// URL (where the run is uploaded), else
        None."""
        if not self.run.output_root.startswith("s3://"):
            return None
        return f"{self.run.output_root.rstrip('/')}/runs/{self.run.name}"

    def validate(self) -> None:
        """Check values beyond their types; raises ConfigError naming the dotted key (cheap: builds nothing)."""
        try:
            for name in ("data", "loss", "monitor"):  # the other engineers' sections check themselves
                getattr(self, name).validate(name)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        check_sections(self)


# ------------------------------------------------------------------------------------- loading
def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Defaults < YAML file `path` < dotted `overrides`; validated. Raises ConfigError with the dotted key.

    `path` is a YAML file or the name of a shipped config (`brats_budget`; see `distseg.config_files`)."""
    raw: dict = {}
    if path is not None:
        p = resolve_config(path)
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    where = f" [config file {p}{' with overrides' if overrides else ''}]" if path is not None else ""
    try:
        cfg = from_dict(ExperimentConfig, raw)
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{e}{where}") from e
    except (TypeError, ValueError) as e:  # a section's own __post_init__ checks
        raise ConfigError(f"{e}{where}") from e
    return cfg


def dump_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def make_run_dir(cfg: ExperimentConfig) -> Path:
    """Create the run folder (0700 when `run.owner_only`); warn when an existing one is writable by others."""
    import logging
    import stat

    run_dir = cfg.run_dir
    if not run_dir.exists():
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        run_dir.mkdir(exist_ok=True)
        if cfg.run.owner_only:
            run_dir.chmod(0o700)
    elif run_dir.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        logging.getLogger(__name__).warning(
            "run folder %s is writable by other users; its checkpoints are unpickled on resume, so only trusted "
            "users may write there (chmod 700 it)", run_dir)
    return run_dir


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (as `dump_yaml` writes them), "key: a -> b"."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{dotted}.")
        elif a != b:
            out.append(f"{dotted}: {a!r} -> {b!r}")
    return out


def write_resolved(cfg: ExperimentConfig, run_dir: Path) -> Path:
    """Write the resolved config to ``<run_dir>/config.yaml`` atomically (write then rename)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(dump_yaml(cfg), encoding="utf-8")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m distseg.config check CONFIG [key=value ...]``: validate and print the resolved config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "check":
        sys.stderr.write("usage: python -m distseg.config check CONFIG [key=value ...]\n")
        return exit_codes.USAGE
    try:
        cfg = load_config(argv[1], argv[2:])
    except ConfigError as e:
        sys.stderr.write(f"config error: {e}\n")
        return exit_codes.USAGE
    sys.stdout.write(dump_yaml(cfg))
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
