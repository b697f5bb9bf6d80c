"""Checkpoints: the step-N layout, atomic completion, resume resolution and retention.

Layout under ``<run>/checkpoints/`` (the reference's, plus a completion marker)::

    accelerator_1/step-N/    generator: weights (full fine-tune), optimizer, LR scheduler, RNG
    accelerator_2/step-N/    guidance model: optimizer, LR scheduler, RNG (its base is the frozen teacher)
    lora_gui/step-N/         the guidance (fake score) LoRA adapter
    lora_gen/step-N/         the generator LoRA adapter (only with --use-lora-gen)
    torch_units/step-N.pt    counters and data position
    step-N.complete.json     written last: the checkpoint exists only once this file does

A crash mid-save leaves parts without a marker: they are invisible to resume and removed by
the next save of the same step or by retention. The Checkpointer never talks to S3: the storage
syncer picks up completed checkpoints from their markers.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dmdr.errors import UserError
from dmdr.logs import get_logger

PARTS = ("accelerator_1", "accelerator_2", "lora_gen", "lora_gui")
UNITS = "torch_units"
_MARKER_RE = re.compile(r"^step-(\d+)\.complete\.json$")
_STEP_RE = re.compile(r"step-(\d+)")


def marker_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step-{step}.complete.json"


def complete_steps(ckpt_dir: Path) -> list[int]:
    """Steps with a completion marker, ascending."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpt_dir.iterdir() if (m := _MARKER_RE.match(p.name)))


def loadable_steps(ckpt_dir: Path) -> list[int]:
    """Complete steps whose files are on THIS machine. On a multi-node run without a shared
    filesystem a node other than the first holds only its own RNG states and a marker; its
    checkpoints are not loadable there (resume pulls them from the store instead)."""
    return [s for s in complete_steps(ckpt_dir) if (ckpt_dir / UNITS / f"step-{s}.pt").is_file()]


def verify_checkpoint(ckpt_dir: Path, step: int, hashes: bool = False) -> None:
    """Check every file of checkpoint ``step`` against its marker: present, the size it lists,
    and with `hashes` the sha256 where the marker has one (markers of pulled checkpoints do). Raises a
    UserError naming the first damaged file: loading it would fail, or (a truncated RNG state)
    silently continue on another random stream."""
    from dmdr.storage.hashio import sha256_file
    from dmdr.storage.layout import read_local_marker

    run_dir = ckpt_dir.parent
    for entry in read_local_marker(run_dir, step).files:
        path = run_dir / entry.path
        try:
            size = path.stat().st_size
        except OSError as e:
            problem = f"{entry.path} is unreadable ({e.strerror})"
        else:
            problem = None if size == entry.size else f"{entry.path} is {size} bytes, the marker says {entry.size}"
            if problem is None and hashes and entry.sha256 and sha256_file(path) != entry.sha256:
                problem = f"{entry.path} does not match the marker's sha256"
        if problem:
            raise UserError(f"checkpoint step-{step} in {ckpt_dir} is damaged: {problem}; resume another step, "
                            "or --resume-ckpt auto, which falls back to the previous complete one")


def step_paths(ckpt_dir: Path, step: int) -> list[Path]:
    """Every path that belongs to checkpoint ``step`` (existing or not)."""
    return [ckpt_dir / part / f"step-{step}" for part in PARTS] + [ckpt_dir / UNITS / f"step-{step}.pt"]


def _files_of(run_dir: Path, paths: list[Path]) -> list[dict[str, Any]]:
    files = []
    for p in paths:
        items = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else ([p] if p.is_file() else [])
        files += [{"path": q.relative_to(run_dir).as_posix(), "size": q.stat().st_size} for q in items]
    return files


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


@contextmanager
def _disk_errors(ckpt_dir: Path, step: int) -> Iterator[None]:
    """A save that fails on the disk (full, read-only, quota, file size limit) is one line naming
    the path and the cause; the partial save has no marker, so it is ignored and replaced later."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - only write failures are translated, the rest re-raised
        text = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.strerror else str(exc)
        if not isinstance(exc, OSError) and not any(k in text for k in _WRITE_FAILURES):
            raise
        free = shutil.disk_usage(ckpt_dir if ckpt_dir.exists() else ckpt_dir.parent).free / 2**30
        raise UserError(
            f"saving checkpoint step-{step} in {ckpt_dir} failed ({text.splitlines()[0][:300]}; {free:.1f} GiB "
            "free): free disk space or make it writable, then resume with --resume-ckpt auto (the partial "
            "save has no marker and is ignored)"
        ) from None


# How write failures show up in torch (inline_container) and safetensors (IoError) messages.
_WRITE_FAILURES = ("inline_container", "IoError", "No space left", "File too large", "Read-only", "Disk quota")


class Checkpointer:
    """Saves and loads training state for a pair of accelerators (generator, guidance).

    ``save_lora`` / ``load_lora`` callbacks write and read the adapters; the accelerators'
    own save/load hooks are set up by the trainer so accelerate skips frozen base weights.
    With FSDP, ``sharded`` (a :class:`dmdr.fsdp.ShardedState`) saves and loads the models,
    optimisers and adapters on every rank instead of the callbacks.
    """

    def __init__(self, run_dir: Path, acc_gen, acc_gui, *, keep_last: int = 0,
                 protected: Callable[[], set[int]] = set, sharded=None):
        self.run_dir = run_dir
        self.protected = protected  # steps retention must keep (e.g. still uploading)
        self.dir = run_dir / "checkpoints"
        self.acc_gen, self.acc_gui = acc_gen, acc_gui
        self.keep_last = keep_last
        self.sharded = sharded
        self.log = get_logger()

    def _accelerate_state(self):
        return self.sharded.accelerate_state() if self.sharded else contextlib.nullcontext()

    # --- saving ------------------------------------------------------------------------
    def save(self, step: int, units: dict[str, Any], save_adapters: Callable[[Path, Path], None],
             prune: bool = True) -> Path:
        """Write checkpoint ``step`` on every rank; the marker goes last. Returns the marker path."""
        acc = self.acc_gen
        marker = marker_path(self.dir, step)
        t0 = time.perf_counter()
        with _disk_errors(self.dir, step):
            if acc.is_local_main_process:  # a re-save of the same step (or a crashed one) starts clean
                _remove(marker)
                for p in step_paths(self.dir, step):
                    _remove(p)
                (self.dir / UNITS).mkdir(parents=True, exist_ok=True)
            acc.wait_for_everyone()
            with self._accelerate_state():
                self.acc_gen.save_state(str(self.dir / "accelerator_1" / f"step-{step}"))
                self.acc_gui.save_state(str(self.dir / "accelerator_2" / f"step-{step}"))
            if self.sharded:
                self.sharded.save(self.dir, step)
            if acc.is_main_process:
                if not self.sharded:
                    save_adapters(self.dir / "lora_gen" / f"step-{step}", self.dir / "lora_gui" / f"step-{step}")
                units_path = self.dir / UNITS / f"step-{step}.pt"
                tmp = units_path.with_suffix(".pt.tmp")
                torch.save(units, tmp)
                tmp.replace(units_path)
            acc.wait_for_everyone()
            if acc.is_local_main_process:
                files = _files_of(self.run_dir, step_paths(self.dir, step))
                _write_json_atomic(marker, {
                    "step": step, "files": files, "world_size": acc.num_processes, "time": time.time(),
                })
            acc.wait_for_everyone()
        self.log.info(f"saved checkpoint step-{step} in {time.perf_counter() - t0:.1f}s: {marker}")
        if prune and acc.is_local_main_process:
            self.prune()
        return marker

    def prune(self) -> None:
        """Keep the last ``keep_last`` complete checkpoints and drop parts without a marker
        that are older than the newest complete one."""
        steps = complete_steps(self.dir)
        if not steps:
            return
        doomed = set(steps[: -self.keep_last]) - self.protected() if self.keep_last > 0 else set()
        newest = steps[-1]
        for part in (*PARTS, UNITS):
            for p in (self.dir / part).glob("step-*") if (self.dir / part).is_dir() else []:
                m = _STEP_RE.match(p.name)
                if not m:
                    continue
                s = int(m.group(1))
                if s in doomed or (s not in steps and s < newest):
                    _remove(p)
        for s in doomed:
            _remove(marker_path(self.dir, s))
            self.log.info(f"retention: removed checkpoint step-{s} (keep_last={self.keep_last})")

    # --- resuming ----------------------------------------------------------------------
    def resolve(self, spec: str | None, flag: str = "--resume-ckpt") -> list[tuple[Path, int]]:
        """Candidates ``(checkpoints_dir, step)`` for ``--resume-ckpt``, newest first.

        ``auto``: every loadable checkpoint of this run, newest first (empty: start fresh);
        ``latest``: the same but an error when there is none; a path: exactly that checkpoint
        (of this run: a resume; of another run: see `init_from`).
        """
        if spec is None:
            return []
        if spec in ("auto", "latest"):
            steps = loadable_steps(self.dir)
            if not steps and spec == "latest":
                raise UserError(
                    f"--resume-ckpt latest: no complete checkpoint in {self.dir}; "
                    "train first, or use --resume-ckpt auto to start fresh when there is none"
                )
            return [(self.dir, s) for s in reversed(steps)]
        return [parse_checkpoint_path(Path(spec).expanduser(), flag)]

    def is_own(self, ckpt_dir: Path) -> bool:
        """Whether ``ckpt_dir`` is this run's checkpoint folder (resume) or another run's (init)."""
        return ckpt_dir.resolve() == self.dir.resolve()

    def init_from(self, ckpt_dir: Path, step: int, load_adapters: Callable[[Path, Path], None],
                  pairs: list[tuple[Any, Any]], keep_optimizer: bool = False) -> None:
        """Start a NEW experiment from another run's checkpoint: its weights (generator, guidance
        LoRA) and none of its training state. ``pairs`` are this run's (optimizer, scheduler),
        as configured: the schedulers always start fresh (this run's learning rates, warmup from
        0); the optimizers too, unless ``keep_optimizer`` keeps the checkpoint's Adam moments, with
        this run's learning rate and other settings. The step counters of both accelerators (the
        gradient-accumulation phase) restart at 0; the caller reseeds the RNGs. The source is only read."""
        fresh = [(copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())) for opt, sched in pairs]
        self.load(ckpt_dir, step, load_adapters)
        for (opt, sched), (opt_state, sched_state) in zip(pairs, fresh):
            if keep_optimizer:
                for group, new in zip(opt.param_groups, opt_state["param_groups"]):
                    group.update({k: v for k, v in new.items() if k != "params"})
            else:
                opt.load_state_dict(opt_state)
            sched.load_state_dict(sched_state)
        self.acc_gen.step = self.acc_gui.step = 0
        kept = "Adam moments kept (--init-keep-optimizer)" if keep_optimizer else "fresh optimisers"
        self.log.info(f"new experiment from another run's checkpoint {ckpt_dir}/step-{step}: generator and "
                      f"guidance LoRA weights loaded; {kept} and LR schedulers at this run's rates "
                      f"({_rates(pairs)}); steps, prompt stream and logs start at 0; the source is only read")

    def load(self, ckpt_dir: Path, step: int, load_adapters: Callable[[Path, Path], None],
             pairs: list[tuple[Any, Any]] = ()) -> dict[str, Any]:
        """Restore both accelerators' state, the adapters and return the torch_units dict. A
        resume keeps the run's own learning rates: a warning says so when ``pairs`` (optimizer,
        scheduler) were configured with other ones."""
        configured = _rates(pairs)
        if not marker_path(ckpt_dir, step).is_file():
            raise UserError(
                f"checkpoint step-{step} in {ckpt_dir} is incomplete (no {marker_path(ckpt_dir, step).name}); "
                "resume from another step or use --resume-ckpt auto"
            )
        verify_checkpoint(ckpt_dir, step)
        try:
            with self._accelerate_state():
                self.acc_gen.load_state(str(ckpt_dir / "accelerator_1" / f"step-{step}"))
                self.acc_gui.load_state(str(ckpt_dir / "accelerator_2" / f"step-{step}"))
            if self.sharded:
                self.sharded.load(ckpt_dir, step)
            else:
                load_adapters(ckpt_dir / "lora_gen" / f"step-{step}", ckpt_dir / "lora_gui" / f"step-{step}")
            units = torch.load(ckpt_dir / UNITS / f"step-{step}.pt", map_location="cpu", weights_only=True)
        except UserError:
            raise
        except Exception as e:  # truncated or foreign files
            raise UserError(
                f"checkpoint step-{step} in {ckpt_dir} cannot be loaded ({e.__class__.__name__}: {e}); "
                f"delete {marker_path(ckpt_dir, step).name} to skip it, or resume from another step"
            ) from e
        if _rates(pairs) != configured:
            self.log.warning(f"WARNING: resuming keeps this run's learning rates ({_rates(pairs)}), not the "
                             f"configured {configured}; start a new experiment with --init-ckpt to change them")
        return units


def _rates(pairs: list[tuple[Any, Any]]) -> str:
    """The base learning rates of (optimizer, scheduler) pairs, as ``lr_gen X, lr_gui Y``."""
    rates = (sched.state_dict()["base_lrs"][0] for _, sched in pairs)
    return ", ".join(f"{name} {lr:g}" for name, lr in zip(("lr_gen", "lr_gui"), rates))


def parse_checkpoint_path(path: Path, flag: str = "--resume-ckpt") -> tuple[Path, int]:
    """Accept ``.../checkpoints/torch_units/step-N.pt`` (the reference's form), a part folder
    ``.../checkpoints/<part>/step-N``, a marker file, or a run directory (its newest checkpoint)."""
    if (path / "checkpoints").is_dir():
        steps = complete_steps(path / "checkpoints")
        if not steps:
            raise UserError(f"{flag}: {path} has no complete checkpoint")
        return path / "checkpoints", steps[-1]
    m = _STEP_RE.search(path.name)
    if not m:
        raise UserError(
            f"{flag}: {path} is not a checkpoint; pass checkpoints/torch_units/step-N.pt, "
            "a run directory, s3://bucket/prefix/exp[/step-N], 'latest' or 'auto'"
        )
    step = int(m.group(1))
    ckpt_dir = path.parent if _MARKER_RE.match(path.name) else path.parent.parent
    if not marker_path(ckpt_dir, step).is_file():
        raise UserError(
            f"{flag}: checkpoint step-{step} under {ckpt_dir} is missing or incomplete "
            f"(no {marker_path(ckpt_dir, step).name})"
        )
    return ckpt_dir, step
