"""The training configuration: one typed dataclass, presets, flags, validation.

Precedence (highest first): command-line flag > environment variable (the few options that
have one, e.g. ``DMDR_S3_URI``) > ``--config FILE`` > ``--preset`` > defaults.
Every field is a flag with the reference implementation's name (``exp_name`` ->
``--exp-name``), and a key of the same name (``exp_name`` or ``exp-name``) in a config file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dmdr.errors import UserError

SAMPLING_TYPES = ("uniform", "logit_normal")


def _f(default: Any, help: str, choices: tuple | None = None, min: float | None = None, **kw):
    """A dataclass field with the metadata the CLI and the validator need."""
    meta = {"help": help, "choices": choices, "min": min, **kw}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything a training run needs. Field docs double as ``--help`` text."""

    # --- run and outputs -------------------------------------------------------------
    output_dir: str = _f("outputs", "Base directory: the run lives in <output-dir>/<exp-name>/.")
    exp_name: str = _f("dmdr", "Experiment name (sub-folder of --output-dir).")
    seed: int = _f(30, "Base random seed (each rank adds its index).")
    cache_dir: str = _f("~/.cache/dmdr", "Cache for built-in tiny models and fetched inputs.")

    # --- models ----------------------------------------------------------------------
    pretrained_model: str = _f(
        "stabilityai/stable-diffusion-xl-base-1.0",
        "Teacher: a local diffusers SDXL folder, 'builtin:tiny', or a hub id (needs network).",
    )
    xl_ode_pretrain_path: str | None = _f(
        None, "Generator init: a raw UNet state_dict (.bin/.safetensors), e.g. DMD2's ODE-regression one-step init, "
        "or DMD2's 4-step UNet with --sample-num-steps 4 --generator-timesteps 999,749,499,249."
    )
    vae: str = _f("tiny", "VAE used to decode x0 for rewards and samples.", choices=("tiny", "full"))
    tiny_vae_path: str | None = _f(
        None, "AutoencoderTiny (taesdxl) folder; default <pretrained>/vae_tiny or $DMDR_WEIGHTS_DIR/taesdxl."
    )
    sample_num_steps: int = _f(1, "Steps of the few-step generator.", min=1)
    conditioning_timestep: int = _f(399, "Generator timestep for one-step sampling (DMD2 uses 399).", min=0)
    shift: float = _f(1.0, "Timestep shift of the few-step grid (1 = none).", min=0.0)
    generator_timesteps: list[int] | None = _f(
        None, "The generator's step timesteps as a list, one per step, descending in [0, 999] (e.g. 999,749,499,249 "
        "as DMD2's 4-step SDXL); default: linspace(999, 0, N+1) shifted by --shift, or --conditioning-timestep "
        "for one step.", list_of=int
    )
    use_lora_gen: bool = _f(False, "Train a LoRA generator (rank 2x, alpha 4x --lora-rank) instead of the full UNet.")
    lora_rank: int = _f(32, "LoRA rank of the guidance (fake score) adapter.", min=1)
    lora_scale_f: float = _f(2.0, "LoRA scale of the fake score.")
    lora_scale_r: float = _f(0.5, "LoRA scale of the real score during --dynamic-step (cosine to 0).")
    gradient_checkpointing: bool = _f(False, "Gradient checkpointing in both UNets (saves memory, costs time).")

    # --- data ------------------------------------------------------------------------
    data_path_train: str = _f("builtin:prompts", "Training prompts, one per line ('builtin:prompts' = a small demo file).")
    sample_prompts: str | None = _f(None, "Prompts for sample grids, one per line (default: built-in list).")
    resolution: int = _f(1024, "Image resolution in pixels (multiple of 8).", min=8)
    batch_size: int = _f(1, "Local batch size per process.", min=1)
    batch_size_test: int = _f(2, "Sample-grid images per process.", min=1)
    num_workers: int = _f(0, "DataLoader workers for prompts.", min=0)

    # --- optimisation -----------------------------------------------------------------
    learning_rate_gen: float = _f(1e-7, "Generator learning rate.", min=0.0)
    learning_rate_gui: float = _f(1e-7, "Guidance (fake score) learning rate.", min=0.0)
    adam_beta1: float = _f(0.9, "AdamW beta1.", min=0.0)
    adam_beta2: float = _f(0.999, "AdamW beta2.", min=0.0)
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.", min=0.0)
    adam_weight_decay: float = _f(0.01, "Generator weight decay (the guidance model uses 0).", min=0.0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).", min=0.0)
    use_8bit_adam: bool = _f(False, "8-bit AdamW from bitsandbytes (CUDA only).")
    mixed_precision: str = _f("no", "Mixed precision.", choices=("no", "fp16", "bf16"))
    gradient_accumulation_steps: int = _f(1, "Gradient accumulation steps.", min=1)
    lr_warmup_steps: int = _f(0, "Linear learning-rate warmup over N optimizer steps of each model, on any number "
                              "of processes (update N is the first at the full rate; 0 = constant).", min=0)
    allow_tf32: bool = _f(True, "TF32 matmuls on CUDA.")
    distributed: str = _f("ddp", "Data-parallel strategy.", choices=("ddp", "fsdp"))

    # --- the DMDR schedule ------------------------------------------------------------
    max_train_steps: int = _f(3001, "Generator steps to train (the run stops exactly there).", min=1)
    cold_start_iter: int = _f(3001, "Generator step from which the reward losses are on.", min=0)
    ratio_update: int = _f(5, "Guidance updates per generator update (two time-scale rule).", min=1)
    dynamic_step: int = _f(0, "Steps of the dynamic strategy (cosine decays); 0 = off.", min=0)
    s_type_gen: str = _f("uniform", "Generator-input timestep sampling.", choices=SAMPLING_TYPES)
    s_type_gui: str = _f("uniform", "Guidance-update and DMD-loss timestep sampling.", choices=SAMPLING_TYPES)
    gen_a: float = _f(1.0, "Beta a for generator timesteps (logit_normal).", min=0.0)
    gen_b: float = _f(1.0, "Beta b for generator timesteps (logit_normal).", min=0.0)
    gui_a: float = _f(4.0, "Beta a for the DMD-loss timesteps (logit_normal).", min=0.0)
    gui_b: float = _f(1.5, "Beta b for the DMD-loss timesteps (logit_normal).", min=0.0)
    gui_fit_a: float = _f(4.0, "Beta a for the guidance (fake score) update timesteps (logit_normal); "
                          "the reference fixes Beta(4, 1.5) here.", min=0.0)
    gui_fit_b: float = _f(1.5, "Beta b for the guidance (fake score) update timesteps (logit_normal).", min=0.0)
    cfg_r: float = _f(7.0, "CFG scale of the real score (drawn in +-0.5 when > 1).", min=0.0)
    cfg_f: float = _f(1.0, "CFG scale of the fake score (drawn in +-0.5 when > 1).", min=0.0)

    # --- rewards ------------------------------------------------------------------------
    clip_reward_model: str | None = _f(None, "CLIP reward checkpoint (Apple_CLIP-H-14-224.bin).")
    hpsv2_reward_model: str | None = _f(None, "HPSv2.1 reward checkpoint (HPS_v2.1_compressed.pt).")
    clip_reward_arch: str = _f(
        "ViT-H-14-quickgelu",
        "open_clip model name or config JSON of the CLIP reward (DFN5B is a QuickGELU ViT-H-14).",
    )
    hps_reward_arch: str = _f("ViT-H-14", "open_clip model name or config JSON of the HPS reward.")
    reward_clip_weight: float = _f(0.0, "Weight of the CLIP hinge loss.", min=0.0)
    reward_hps_weight: float = _f(0.0, "Weight of the HPS hinge loss.", min=0.0)
    magic_prompt: str | None = _f(None, "Prefix of the HPS text (e.g. 'Realistic photo').")

    # --- checkpoints, samples, logs -----------------------------------------------------
    checkpoint_steps: int = _f(500, "Save a checkpoint every N generator steps.", min=1)
    sample_steps: int = _f(100, "Write a sample grid every N generator steps.", min=1)
    keep_last: int = _f(0, "Keep only the last K complete checkpoints (0 = keep all).", min=0)
    resume_ckpt: str | None = _f(
        None, "Resume this run: 'auto', 'latest', or a checkpoint path (torch_units/step-N.pt or its step); "
        "a checkpoint of ANOTHER run (path or s3:// URI) starts a new experiment from it, as --init-ckpt does."
    )
    init_ckpt: str | None = _f(
        None, "Start a NEW experiment from another run's checkpoint (e.g. stage 1 for stage 2) when --resume-ckpt "
        "finds nothing of this run: a path as for --resume-ckpt or s3://bucket/prefix/exp[/step-N] (pulled, "
        "sha256-verified). Its generator and guidance LoRA weights load; optimisers and LR schedulers start "
        "fresh at this run's rates; steps count from 0."
    )
    init_keep_optimizer: bool = _f(
        False, "With --init-ckpt: keep the source's Adam moments (the learning rates are still this run's)."
    )
    overwrite: bool = _f(
        False, "Start over in a run directory that already holds a run: delete its local files and its remote "
        "objects first (refused while another live job holds the run's lease)."
    )
    log_every: int = _f(1, "Progress line every N generator steps.", min=1)

    # --- object storage (S3, MinIO, Ceph RGW, R2); credentials come from the AWS chain ------
    s3_uri: str | None = _f(
        None, "Remote home of runs, s3://bucket/prefix (the run mirrors to <prefix>/<exp-name>/).", env="DMDR_S3_URI"
    )
    s3_endpoint_url: str | None = _f(
        None, "Custom S3 endpoint (MinIO, Ceph, R2); default AWS_ENDPOINT_URL or AWS.", env="DMDR_S3_ENDPOINT_URL"
    )
    s3_region: str | None = _f(None, "S3 region (default: the AWS chain, then us-east-1).")
    s3_path_style: bool = _f(False, "Path-style S3 addressing (most MinIO/Ceph setups).", env="DMDR_S3_PATH_STYLE")
    sync_interval: float = _f(60.0, "Seconds between uploads of the logs (they are also uploaded at exit).", min=0.0)
    s3_wait_timeout: float = _f(
        300.0, "At a checkpoint, wait at most this long for the previous one's upload; then save locally and "
        "train on (a slow or hung store never stops training).", min=0.0
    )
    takeover: bool = _f(
        False, "Take the run's lease over from a job that still renews it (only when that job is known dead: "
        "a live one is stopped at its next renewal)."
    )
    lease_ttl: float = _f(
        120.0, "Seconds after its last renewal at which a job's lease on the run expires and another job may "
        "take the run over.", min=1.0
    )
    lease_renew: float = _f(30.0, "Seconds between renewals of the run's lease (keep well below --lease-ttl).", min=0.1)
    checkpoint_on_sigterm: bool = _f(False, "On SIGTERM (pod eviction), save a checkpoint before flushing and exiting.")
    shutdown_grace: float = _f(
        25.0, "Seconds to flush pending uploads on SIGTERM (torchrun kills workers 30 s after it).", min=0.0
    )
    report_to: str = _f(
        "none", "Experiment trackers: none, tensorboard, wandb, mlflow, a comma list of them, or all (every one "
        "installed). They get the options, every loss-log scalar and the sample grids."
    )
    tracker_project: str = _f("dmdr", "W&B project, MLflow experiment and TensorBoard sub-folder of --report-to.")
    tracker_run_name: str | None = _f(None, "Run name in the trackers; default: --exp-name.")

    # ------------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser() / self.exp_name

    def to_dict(self) -> dict[str, Any]:
        """The options as written to args.json and trackers: URLs without credentials."""
        from dmdr.redact import redact_values

        return redact_values(dataclasses.asdict(self))


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def _base_type(name: str) -> type:
    tp = _TYPES[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("dmdr.presets").iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    path = resources.files("dmdr.presets") / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"--preset: unknown preset {name!r}; choose one of {', '.join(preset_names())}")
    return _normalise(yaml.safe_load(path.read_text()) or {}, f"preset {name}")


def load_config_file(path: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--config: file {path} not found; pass a YAML file of trainer options")
    try:
        data = yaml.safe_load(p.read_text()) if p.suffix != ".json" else json.loads(p.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise UserError(f"--config: {path} is not valid YAML/JSON ({e.__class__.__name__}); fix the syntax") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config: {path} must be a mapping of option: value")
    return _normalise(data, str(path))


def _normalise(data: dict[str, Any], source: str) -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name != "preset" and name not in FIELDS:
            raise UserError(f"{source}: unknown option {key!r}; see `dmdr train --help` for the options")
        out[name] = value
    return out


def sections() -> dict[str, str]:
    """field name -> its section of `TrainConfig` (the ``# --- title ---`` comment above it)."""
    import inspect
    import re

    out, title = {}, "training options"
    for line in inspect.getsource(TrainConfig).splitlines():
        marker = re.match(r"\s*# -+ (.+?)(?: -+)?$", line)
        field_line = re.match(r"\s+(\w+): .+= _f\(", line)
        if marker:
            title = marker.group(1).split(";")[0].strip()
        elif field_line and field_line.group(1) in FIELDS:
            out[field_line.group(1)] = title
    return out


def _help(name: str, f: dataclasses.Field) -> str:
    """The field's help, then its choices, default and environment variable (as --help shows them)."""
    extra = []
    if f.metadata.get("choices"):
        extra.append("choices: " + ", ".join(map(str, f.metadata["choices"])))
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    extra.append(f"default: {'none' if default is None else default}")
    if f.metadata.get("env"):
        extra.append(f"env {f.metadata['env']}")
    return (f.metadata["help"] + " [" + "; ".join(extra) + "]").replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field, grouped by section. Defaults are suppressed so only flags given by the
    user are seen (the help text shows each default)."""
    parser.add_argument("--preset", default=argparse.SUPPRESS, help=f"Preset: {', '.join(preset_names())}.")
    parser.add_argument("--config", default=argparse.SUPPRESS, help="YAML file of options (same names as the flags).")
    where, groups = sections(), {}
    for name, f in FIELDS.items():
        title = where.get(name, "training options")
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        tp = _base_type(name)
        flag = "--" + name.replace("_", "-")
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _help(name, f)}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif f.metadata.get("list_of"):
            kw.update(type=str, metavar="T1,T2,...")
        else:
            kw["type"] = _parse_optional(tp, keep_empty=name in _EMPTY_IS_ERROR) if _TYPES[name] != tp else tp
            choices = f.metadata.get("choices")
            kw["metavar"] = "{" + ",".join(choices) + "}" if choices else tp.__name__.upper()
        group.add_argument(flag, **kw)


_EXP_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")

# An empty value here is an unset template variable, not "none": `validate` refuses it.
_EMPTY_IS_ERROR = ("resume_ckpt", "init_ckpt")


def _parse_optional(tp: type, keep_empty: bool = False):
    def parse(text: str):
        if text == "" and keep_empty:
            return text
        return None if text.lower() in ("", "none", "null") else tp(text)

    parse.__name__ = tp.__name__
    return parse


def env_values() -> dict[str, Any]:
    """Options set through their environment variable (e.g. DMDR_S3_URI from the chart)."""
    import os

    return {name: os.environ[f.metadata["env"]] for name, f in FIELDS.items()
            if f.metadata.get("env") and os.environ.get(f.metadata["env"])}


def build_config(flags: dict[str, Any]) -> TrainConfig:
    """Merge defaults < preset < config file < environment < flags, then validate."""
    flags = dict(flags)
    file_values = load_config_file(flags.pop("config")) if "config" in flags else {}
    preset = flags.pop("preset", None) or file_values.pop("preset", None)
    file_values.pop("preset", None)
    merged: dict[str, Any] = {}
    if preset:
        merged.update({k: v for k, v in load_preset(preset).items() if k != "preset"})
    merged.update(file_values)
    merged.update(env_values())
    merged.update(flags)
    values = {name: _coerce(name, value) for name, value in merged.items()}
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def _int_list(flag: str, value: Any) -> list[int] | None:
    """A list of integers from a flag's text (``999,749,499,249``, spaces or brackets allowed) or a YAML list."""
    items = value
    if isinstance(value, str):
        text = value.strip().strip("[]").strip()
        if text.lower() in ("", "none", "null"):
            return None
        items = [v for v in re.split(r"[,\s]+", text) if v]
    try:
        if not isinstance(items, (list, tuple)) or any(isinstance(v, (bool, float)) for v in items):
            raise ValueError
        return [int(v) for v in items]
    except (TypeError, ValueError):
        raise UserError(f"{flag}: {value!r} is not a list of integer timesteps (e.g. 999,749,499,249)") from None


def _coerce(name: str, value: Any) -> Any:
    tp = _base_type(name)
    flag = "--" + name.replace("_", "-")
    if FIELDS[name].metadata.get("list_of"):
        return _int_list(flag, value)
    if value is None:
        if _TYPES[name] is tp:
            raise UserError(f"{flag}: a value is required")
        return None
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if tp in (int, float) and isinstance(value, bool):  # YAML `true` is not the number 1
            raise ValueError
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        value = tp(value)
        if tp is float and not math.isfinite(value):
            raise UserError(f"{flag}: {value!r} is not a finite number")
        return value
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{flag}: {value!r} is not a valid {tp.__name__}") from None


def validate(cfg: TrainConfig) -> None:
    """Reject bad values with one line naming the option and what is allowed."""
    for name, f in FIELDS.items():
        value = getattr(cfg, name)
        flag = "--" + name.replace("_", "-")
        choices, lo = f.metadata.get("choices"), f.metadata.get("min")
        if choices and value not in choices:
            raise UserError(f"{flag}: {value!r} is not allowed; choose one of {', '.join(choices)}")
        if lo is not None and value is not None and value < lo:
            raise UserError(f"{flag}: {value!r} is too small; it must be >= {lo}")
    if not _EXP_NAME_RE.fullmatch(cfg.exp_name) or cfg.exp_name in (".", ".."):
        raise UserError(f"--exp-name: {cfg.exp_name!r} must be one folder name of letters, digits, '.', '_' or '-' "
                        "(at most 128 characters): it names <output-dir>/<exp-name> and <s3-uri>/<exp-name>/")
    if cfg.resolution % 8:
        raise UserError(f"--resolution: {cfg.resolution} must be a multiple of 8 (the VAE downsamples by 8)")
    if not 0 <= cfg.conditioning_timestep <= 999:
        raise UserError(f"--conditioning-timestep: {cfg.conditioning_timestep} must be in [0, 999]")
    _check_generator_timesteps(cfg)
    if cfg.s3_uri is not None and not cfg.s3_uri.startswith("s3://"):
        raise UserError(f"--s3-uri: {cfg.s3_uri!r} is not an s3://bucket/prefix URI")
    for name in _EMPTY_IS_ERROR:
        if getattr(cfg, name) is not None and not getattr(cfg, name).strip():
            raise UserError(f"--{name.replace('_', '-')}: the value is empty; give a checkpoint path"
                            + (", 'latest' or 'auto'" if name == "resume_ckpt" else "") + " (or leave the flag out)")
    from dmdr import tracking

    tracking.parse(cfg.report_to)  # an unknown or uninstalled tracker fails now
    if cfg.lease_renew >= cfg.lease_ttl:
        raise UserError(f"--lease-renew: {cfg.lease_renew} must be below --lease-ttl {cfg.lease_ttl}, or the lease "
                        "expires between renewals")
    for spec in (cfg.resume_ckpt, cfg.init_ckpt):
        if spec is not None and spec.startswith("s3://"):
            from dmdr.storage.uri import S3Uri

            S3Uri.parse(spec)  # a malformed URI fails now, with one line
    for flag, weight, path in (
        ("--reward-clip-weight", cfg.reward_clip_weight, cfg.clip_reward_model),
        ("--reward-hps-weight", cfg.reward_hps_weight, cfg.hpsv2_reward_model),
    ):
        if weight > 0 and not path:
            model_flag = "--clip-reward-model" if "clip" in flag else "--hpsv2-reward-model"
            raise UserError(f"{flag}: {weight} needs {model_flag} (a reward checkpoint file)")


def _check_generator_timesteps(cfg: TrainConfig) -> None:
    steps = cfg.generator_timesteps
    if steps is None:
        return
    flag = f"--generator-timesteps {','.join(map(str, steps))}"
    if len(steps) != cfg.sample_num_steps:
        raise UserError(f"{flag}: {len(steps)} timesteps for --sample-num-steps {cfg.sample_num_steps}; "
                        "give one timestep per generator step")
    if not all(0 <= t <= 999 for t in steps):
        raise UserError(f"{flag}: every timestep must be in [0, 999]")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise UserError(f"{flag}: the timesteps must be strictly descending (e.g. 999,749,499,249)")
    if cfg.shift != 1.0:
        raise UserError(f"{flag}: --shift {cfg.shift} does not apply to a list of timesteps (used as given); "
                        "drop --shift or the list")


def save_args(cfg: TrainConfig, path: Path) -> None:
    """Write the effective config (args.json), credentials stripped from every URL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
