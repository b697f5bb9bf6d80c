"""Training prompts: a one-prompt-per-line file with a byte-offset index, and a resumable sampler.

`PromptFile` indexes the non-blank lines of a UTF-8 text file with numpy (no per-line Python
work for ordinary prompts) and reads prompts on demand from an mmap, so a 2M-line file costs
two int64 arrays and DataLoader workers forked from the trainer share them.

`ResumableSampler` fixes the order of every epoch from (seed, epoch) and splits each global batch
into disjoint per-rank shards; `PromptStream` hands out local batches forever and its state dict
(epoch, batches handed out) restores the exact same future batches after a resume.

Lines are separated by b"\\n" only; a prompt is its line with `str.strip()` applied (so CRLF,
tabs and Unicode spaces at either end go), and a line that strips to "" is blank and skipped.
"""
from __future__ import annotations

import codecs
import hashlib
import itertools
import mmap
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dmdr.errors import UserError

__all__ = [
    "SAMPLE_PROMPTS",
    "PromptFile",
    "PromptStream",
    "ResumableSampler",
    "load_prompt_list",
    "prompt_seed",
]

SAMPLE_PROMPTS: list[str] = [
    "a red fox curled up asleep in fresh snow at dawn, soft golden light",
    "portrait of an elderly fisherman with a weathered face, studio lighting, 85mm photo",
    "a futuristic city skyline at night with neon signs reflected in wet streets",
    "a bowl of ramen with a soft-boiled egg and green onions, overhead food photography",
    "watercolor painting of a lighthouse on a rocky cliff during a storm",
    "a small robot watering potted plants on a sunny apartment balcony, 3d render",
    "an astronaut riding a horse across a desert of pink sand, cinematic wide shot",
    "a cozy library with tall wooden shelves, a reading chair and a sleeping cat",
]

_UTF8_BOM = codecs.BOM_UTF8
_CHUNK_BYTES = 1 << 24  # bytes scanned per numpy pass while indexing (bounded memory)

# ASCII bytes that `str.strip()` removes: \t \n \v \f \r, \x1c-\x1f and space.
_ASCII_SPACE = np.zeros(256, dtype=bool)
_ASCII_SPACE_BYTES = b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f "
_ASCII_SPACE[list(_ASCII_SPACE_BYTES)] = True
_TRIM_PASSES = 4  # vectorised trimming passes before falling back to per-line `bytes.strip`
# UTF-8 encodings of the non-ASCII code points that `str.strip()` removes (U+0085 ... U+3000;
# none lies above U+3000). A trimmed line that starts with none of them holds a printable
# character; the rare others are decoded to check.
_UNICODE_SPACES: tuple[bytes, ...] = tuple(
    chr(c).encode() for c in range(0x80, 0x3001) if chr(c).isspace()
)
_UNICODE_SPACE_LEAD = np.zeros(256, dtype=bool)
_UNICODE_SPACE_LEAD[[space[0] for space in _UNICODE_SPACES]] = True


def prompt_seed(prompt: str, base_seed: int) -> int:
    """A fixed per-prompt seed: (base_seed + sha256(prompt)[:4] as big-endian int) % 2**31."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return (base_seed + int.from_bytes(digest[:4], "big")) % 2**31


class PromptFile(Dataset):
    """The non-blank lines of a UTF-8 prompt file, indexed once by byte offsets.

    `starts`/`ends` (int64) bound each prompt's bytes with ASCII whitespace already trimmed;
    `self[i]` decodes that slice from an mmap opened lazily in each process.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.starts, self.ends, self._size = _index_prompts(self.path)
        self._mm: mmap.mmap | None = None

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def __getitem__(self, i: int) -> str:
        if not -len(self) <= i < len(self):
            raise IndexError(f"prompt index {i} out of range for {len(self)} prompts")
        mm = self._mm if self._mm is not None else self._open()
        return mm[self.starts[i] : self.ends[i]].decode("utf-8").strip()

    def _open(self) -> mmap.mmap:
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != self._size:
                raise UserError(
                    f"prompt file {self.path} changed size since it was indexed ({self._size} -> "
                    f"{size} bytes); do not edit it during training, or restart to re-index it."
                )
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def __getstate__(self) -> dict[str, Any]:
        # An mmap cannot be pickled (spawned DataLoader workers); each process reopens its own.
        return {**self.__dict__, "_mm": None}


def load_prompt_list(path: str | os.PathLike[str]) -> list[str]:
    """All prompts of a SMALL file (e.g. sample prompts), with the same rules as `PromptFile`."""
    prompts = PromptFile(path)
    return [prompts[i] for i in range(len(prompts))]


def _index_prompts(path: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Return (starts, ends, file size) of the non-blank lines; raise UserError on bad input."""
    if not os.path.isfile(path):
        raise UserError(f"prompt file {path} does not exist or is not a file; check the path.")
    size = os.path.getsize(path)
    no_prompts = UserError(
        f"prompt file {path} has no prompts (it is empty or only blank lines); "
        "put one prompt per line."
    )
    if size == 0:
        raise no_prompts
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    lo = len(_UTF8_BOM) if buf[: len(_UTF8_BOM)].tobytes() == _UTF8_BOM else 0
    starts, ends = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    lines_before = 0
    while lo < size:
        hi, newlines = _next_chunk(buf, lo, size)
        chunk = buf[lo:hi]
        _check_utf8(chunk, newlines, path, lo, lines_before)
        s, e = _prompt_spans(chunk, newlines)
        starts.append(s + lo)
        ends.append(e + lo)
        lines_before += len(newlines)
        lo = hi
    del buf
    start_arr, end_arr = np.concatenate(starts), np.concatenate(ends)
    if start_arr.size == 0:
        raise no_prompts
    return start_arr, end_arr, size


def _next_chunk(buf: np.ndarray, lo: int, size: int) -> tuple[int, np.ndarray]:
    """End of a chunk from `lo` that holds whole lines, and its newline offsets (from `lo`)."""
    window = _CHUNK_BYTES
    while True:
        hi = min(lo + window, size)
        newlines = np.flatnonzero(buf[lo:hi] == 10)
        if hi == size:
            return hi, newlines
        if newlines.size:
            return lo + int(newlines[-1]) + 1, newlines
        window *= 2  # one line longer than the window: widen until it ends


def _check_utf8(
    chunk: np.ndarray, newlines: np.ndarray, path: str, lo: int, lines_before: int
) -> None:
    """Validate a chunk with one C-level decode; name the line and byte offset of any bad byte."""
    try:
        codecs.utf_8_decode(chunk, "strict", True)
    except UnicodeDecodeError as err:
        line = lines_before + int(np.searchsorted(newlines, err.start)) + 1
        raise UserError(
            f"prompt file {path} is not valid UTF-8 at line {line} (byte offset {lo + err.start}: "
            f"{err.reason}); re-save the file as UTF-8."
        ) from None


def _prompt_spans(chunk: np.ndarray, newlines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Byte spans (relative to the chunk) of the non-blank lines, ASCII whitespace trimmed."""
    starts = np.concatenate(([0], newlines + 1)).astype(np.int64)
    ends = np.concatenate((newlines, [chunk.shape[0]])).astype(np.int64)
    _trim(chunk, starts, ends, from_start=True)
    _trim(chunk, starts, ends, from_start=False)
    keep = starts < ends
    # Lines that begin with a Unicode space may be blank: decode those few to decide.
    nonempty = np.flatnonzero(keep)
    for k in nonempty[_unicode_space_starts(chunk, starts[nonempty])]:
        keep[k] = bool(chunk[starts[k] : ends[k]].tobytes().decode("utf-8").strip())
    return starts[keep], ends[keep]


def _unicode_space_starts(chunk: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Indices into `starts` whose bytes begin one of `_UNICODE_SPACES`."""
    idx = np.flatnonzero(_UNICODE_SPACE_LEAD[chunk[starts]])
    last = chunk.shape[0] - 1
    heads = [chunk[np.minimum(starts[idx] + i, last)] for i in range(3)]
    found = np.zeros(idx.shape, dtype=bool)
    for space in _UNICODE_SPACES:
        match = heads[0] == space[0]
        for i in range(1, len(space)):
            match &= heads[i] == space[i]
        found |= match
    return idx[found]


def _trim(chunk: np.ndarray, starts: np.ndarray, ends: np.ndarray, *, from_start: bool) -> None:
    """Move `starts` forward (or `ends` back) past ASCII whitespace, in place.

    A few vectorised passes, one byte of every line per pass, cover the usual CR or stray
    space; the rare lines with longer runs are then finished one by one with `bytes.strip`.
    """
    active = np.flatnonzero(starts < ends)
    for _ in range(_TRIM_PASSES):
        if not active.size:
            return
        edge = starts[active] if from_start else ends[active] - 1
        active = active[_ASCII_SPACE[chunk[edge]]]
        if from_start:
            starts[active] += 1
        else:
            ends[active] -= 1
        active = active[starts[active] < ends[active]]
    for k in active:
        line = chunk[starts[k] : ends[k]].tobytes()
        if from_start:
            starts[k] = ends[k] - len(line.lstrip(_ASCII_SPACE_BYTES))
        else:
            ends[k] = starts[k] + len(line.rstrip(_ASCII_SPACE_BYTES))


class ResumableSampler(Sampler[int]):
    """Deterministic, sharded, resumable order over `dataset_len` items.

    Epoch e is `torch.randperm` under `manual_seed(seed + e)`. Global batch s of the epoch is
    perm[s*B*W : (s+1)*B*W] (B = batch_size, W = world_size) and rank r takes its r-th slice of
    B items, so ranks are disjoint and each has `batches_per_epoch` full batches (the tail that
    does not fill a global batch is dropped). Iterating yields this rank's indices from batch
    `position` of `epoch` to the end of the epoch; it does not change the state, the consumer
    records progress (see `PromptStream`).
    """

    def __init__(
        self, dataset_len: int, batch_size: int, rank: int, world_size: int, seed: int
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        global_batch = batch_size * world_size
        if dataset_len < global_batch:
            raise UserError(
                f"the prompt file has {dataset_len} prompts, fewer than one global batch "
                f"({batch_size} per rank x {world_size} ranks = {global_batch}); "
                "use more prompts or a smaller batch size."
            )
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.batches_per_epoch = dataset_len // global_batch
        self.epoch = 0
        self.position = 0

    def epoch_batches(self, epoch: int) -> torch.Tensor:
        """This rank's batches of `epoch` as a [batches_per_epoch, batch_size] int64 tensor."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.dataset_len, generator=generator)
        used = perm[: self.batches_per_epoch * self.batch_size * self.world_size]
        grid = used.view(self.batches_per_epoch, self.world_size, self.batch_size)
        return grid[:, self.rank].clone()

    def iter_batches(self, epoch: int, position: int = 0) -> Iterator[list[int]]:
        """This rank's batches of `epoch`, starting at batch `position`."""
        yield from self.epoch_batches(epoch)[position:].tolist()

    def __iter__(self) -> Iterator[int]:
        for batch in self.iter_batches(self.epoch, self.position):
            yield from batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.position) * self.batch_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise UserError(
                f"prompt sampler state epoch={epoch}, position={position} does not fit "
                f"{self.batches_per_epoch} batches per epoch (the prompt file, batch size or "
                "world size changed since the checkpoint); resume with the same settings."
            )
        if position == self.batches_per_epoch:  # the epoch was used up: start the next one
            epoch, position = epoch + 1, 0
        self.epoch, self.position = epoch, position


class _BatchesFrom:
    """Batch sampler for a DataLoader: this rank's batches from (epoch, position), forever."""

    def __init__(self, sampler: ResumableSampler, epoch: int, position: int) -> None:
        self.sampler, self.epoch, self.position = sampler, epoch, position

    def __iter__(self) -> Iterator[list[int]]:
        for epoch in itertools.count(self.epoch):
            yield from self.sampler.iter_batches(epoch, self.position if epoch == self.epoch else 0)


def _as_list(prompts: list[str]) -> list[str]:
    return list(prompts)


class PromptStream:
    """Endless local batches of prompts for one rank, resumable batch-exactly.

    The state is (epoch, position) where position counts the batches handed to the caller in
    this epoch; batches prefetched by DataLoader workers but not handed out are not counted, so a
    stream restored from `state_dict()` yields exactly the batches the original would have.
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int = 0) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.sampler = ResumableSampler(len(dataset), batch_size, rank, world_size, seed)
        self._batches: Iterator[list[str]] | None = None

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def next_batch(self) -> list[str]:
        """The next local batch; rolls over into the next epoch when this one is used up."""
        if self._batches is None:
            self._batches = self._start()
        batch = next(self._batches)
        self.sampler.position += 1
        if self.sampler.position == self.sampler.batches_per_epoch:
            self.sampler.epoch += 1
            self.sampler.position = 0
        return batch

    def _start(self) -> Iterator[list[str]]:
        indices = _BatchesFrom(self.sampler, self.sampler.epoch, self.sampler.position)
        if self.num_workers == 0:
            return ([self.dataset[i] for i in batch] for batch in indices)
        loader = DataLoader(self.dataset, batch_sampler=indices, num_workers=self.num_workers,
                            collate_fn=_as_list)
        return iter(loader)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state`; any prefetched batches of the old position are dropped."""
        self.sampler.load_state_dict(state)
        self._batches = None  # the old iterator (and its workers) is discarded
