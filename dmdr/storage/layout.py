"""The run layout shared by the trainer, the syncer and the remote readers.

Local and remote trees are the same below the experiment directory::

    args.json, log.txt, loss_logs/*.jsonl, samples/*.png, plots/losses.png, tensorboard/**
    checkpoints/{accelerator_1,accelerator_2,lora_gen,lora_gui}/step-N/...
    checkpoints/torch_units/step-N.pt
    checkpoints/step-N.complete.json     local marker / remote manifest (written last)
    checkpoints/step-N.parts/<attempt>/node-K.json  remote only, multi-node part manifests
    checkpoints/latest.json              remote only: {"step": N, "manifest": "<rel path>"}
    checkpoints/step-N.<group>.json      local only: a `dmdr pull --only generator|lora` (not a checkpoint)

A checkpoint without its marker (locally) or manifest (remotely) does not exist.
"""
from __future__ import annotations

import fnmatch
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dmdr.errors import UserError

CHECKPOINTS = "checkpoints"
LATEST_REL = f"{CHECKPOINTS}/latest.json"
# tensorboard/: the event files of --report-to tensorboard (new files per attempt, appended to);
# tracking.json: the W&B / MLflow run ids that the next attempt continues
LOG_PATTERNS = ("args.json", "log.txt", "loss_logs/*.jsonl", "tensorboard/**/*", "tracking.json")
_STEP_RE = re.compile(r"(?:^|/)step-(\d+)(?=[./]|$)")
_MANIFEST_RE = re.compile(rf"^{CHECKPOINTS}/step-(\d+)\.complete\.json$")

# --only groups for pulls: the files below checkpoints/ each group keeps (fnmatch patterns, `*`
# crosses folders). "generator" is what `dmdr sample`/`export` read: the generator's weights (or
# its FSDP shards, which hold weights and optimiser state together) and its LoRA, never the
# optimiser, scheduler or RNG states that only a resume needs.
ONLY_GROUPS: dict[str, tuple[str, ...] | None] = {
    "all": None,
    "generator": ("accelerator_1/step-*/model*.safetensors", "accelerator_1/step-*/sharded/*", "lora_gen/*"),
    "lora": ("lora_gen/*", "lora_gui/*"),
}
# The run's own files a pull brings along: `dmdr sample`/`export` read args.json, `dmdr plot` the loss logs.
RUN_FILES = ("args.json", "loss_logs/loss_gen_log.jsonl", "loss_logs/loss_gui_log.jsonl")
_SUBSET_MARKER_RE = re.compile(rf"^step-(\d+)\.({'|'.join(g for g in ONLY_GROUPS if g != 'all')})\.json$")


def marker_rel(step: int) -> str:
    """Path of step N's local marker / remote manifest, relative to the experiment dir."""
    return f"{CHECKPOINTS}/step-{step}.complete.json"


def pulled_marker_rel(step: int, only: str) -> str:
    """The marker a pull of step N writes last: the checkpoint's own for ``--only all``, else
    ``checkpoints/step-N.<group>.json`` (files of that group only; resume never reads it)."""
    return marker_rel(step) if only == "all" else f"{CHECKPOINTS}/step-{step}.{only}.json"


def pulled_subset_steps(ckpt_dir: Path, only: str) -> list[int]:
    """Steps whose ``--only`` group was pulled completely into `ckpt_dir` (ascending)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpt_dir.iterdir()
                  if (m := _SUBSET_MARKER_RE.match(p.name)) and m.group(2) == only)


def part_rel(step: int, node: int, attempt: str) -> str:
    """Remote path of node K's part manifest for step N in one attempt (multi-node runs only)."""
    return f"{CHECKPOINTS}/step-{step}.parts/{attempt}/node-{node}.json"


def step_of(rel: str) -> int | None:
    """The checkpoint step a path under checkpoints/ belongs to (None for other paths)."""
    if not rel.startswith(f"{CHECKPOINTS}/"):
        return None
    match = _STEP_RE.search(rel[len(CHECKPOINTS) + 1:])
    return int(match.group(1)) if match else None


def manifest_step(rel: str) -> int | None:
    """N when `rel` is ``checkpoints/step-N.complete.json``, else None."""
    match = _MANIFEST_RE.match(rel)
    return int(match.group(1)) if match else None


def in_group(rel: str, only: str) -> bool:
    """Whether a checkpoint file belongs to the ``--only`` group."""
    if only not in ONLY_GROUPS:
        raise UserError(f"--only '{only}' is not known: use one of {', '.join(ONLY_GROUPS)}.")
    patterns = ONLY_GROUPS[only]
    if patterns is None:
        return True
    head, _, below = rel.partition("/")
    return head == CHECKPOINTS and any(fnmatch.fnmatchcase(below, p) for p in patterns)


@dataclass
class FileEntry:
    """One checkpoint file: path relative to the experiment dir, size, and sha256 (remote)."""

    path: str
    size: int
    sha256: str | None = None


@dataclass
class Manifest:
    """A local completion marker or a remote manifest.

    Attributes:
        step: training step of the checkpoint.
        files: every file of the checkpoint (on this node, for a local marker).
        world_size: number of ranks that wrote it.
        time: when the checkpoint was written (epoch seconds).
        num_nodes: nodes that contributed files (remote manifests).
    """

    step: int
    files: list[FileEntry]
    world_size: int = 1
    time: float = field(default_factory=time.time)
    num_nodes: int = 1

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> "Manifest":
        """Parse a marker/manifest; UserError naming `where` when it is malformed."""
        try:
            data = json.loads(text)
            files = [FileEntry(str(f["path"]), int(f["size"]), f.get("sha256")) for f in data["files"]]
            _check_paths([f.path for f in files])
            return cls(int(data["step"]), files, int(data.get("world_size", 1)),
                       float(data.get("time", 0.0)), int(data.get("num_nodes", 1)))
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"The checkpoint marker {where} is malformed ({exc}): delete it and "
                            "re-save or re-pull that checkpoint.") from None


def verification(manifest: Manifest) -> str:
    """What a verified transfer of `manifest`'s files checked, in words (never more than ran)."""
    missing = sum(1 for f in manifest.files if not f.sha256)
    if not missing:
        return "sha256 verified"
    return f"sizes verified; the manifest has no sha256 for {missing} of {len(manifest.files)} file(s)"


def _check_paths(paths: list[str]) -> None:
    """Every entry is a distinct file below checkpoints/: no '', '.', '..' segments, no NUL or
    backslash, none inside another entry (a folder name listed as a file)."""
    seen = set(paths)
    if len(seen) != len(paths):
        raise ValueError("a path is listed twice")
    for path in paths:
        parts = path.split("/")
        if (parts[0] != CHECKPOINTS or len(parts) < 2 or "\x00" in path or "\\" in path
                or any(p in ("", ".", "..") for p in parts)):
            raise ValueError(f"unsafe path {path!r}")
        if any("/".join(parts[:i]) in seen for i in range(2, len(parts))):
            raise ValueError(f"{path!r} lies inside another listed file")


def read_local_marker(exp_dir: Path, step: int) -> Manifest:
    """Read step N's local completion marker (UserError when it is missing or malformed)."""
    path = Path(exp_dir) / marker_rel(step)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"Checkpoint step {step} has no completion marker at {path}: it was not "
                        "saved completely; save it again.") from None
    manifest = Manifest.from_json(text, str(path))
    if manifest.step != step:
        raise UserError(f"The marker {path} names step {manifest.step}, not {step}: delete it.")
    return manifest
