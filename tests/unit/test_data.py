"""Prompt file index, resumable sampler and prompt stream (dmdr/data.py)."""
from __future__ import annotations

import hashlib
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dmdr import data
from dmdr.data import (SAMPLE_PROMPTS, PromptFile, PromptStream, ResumableSampler,
                       load_prompt_list, prompt_seed)
from dmdr.errors import UserError

CASES = {
    "plain": b"a cat\na dog\nthe sea\n",
    "no_final_newline": b"first\nsecond\nthird",
    "blank_and_whitespace_lines": b"\n\n  \t \none\n\n\x0b\x0c\n  two  \n\t\n",
    "crlf": b"a photo\r\n\r\n  spaced  \r\nlast\r\n",
    "crlf_no_final_newline": b"x\r\ny",
    "unicode": "caf\u00e9 \u00e0 Paris\n\u732b\u306e\u5199\u771f\n\U0001f98a fox\n\u201cq\u201d\n"
    .encode(),
    "unicode_spaces": "\u3000\n\u00a0\u2003 \n\u3000in\u3000\n\u00a0x\n\u0085\n\u2028\n".encode(),
    "bom": "\ufeffwith bom\nsecond\n".encode(),
    "single_line": b"only",
    "long_whitespace_runs": b" " * 50 + b"x" + b"\t " * 30 + b"\n" + b" \r" * 40
    + b"\n\x1c y\x1f\n",
    "long_and_short": b"s\n" + b"w" * 5000 + b"\n\n" + b"t",
}


def naive_prompts(raw: bytes) -> list[str]:
    """The reference reader: split on \\n, str.strip, drop blanks."""
    return [s.strip() for s in raw.decode("utf-8-sig").split("\n") if s.strip()]


def write(tmp_path: Path, raw: bytes, name: str = "prompts.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(raw)
    return path


# ---------------------------------------------------------------- PromptFile


@pytest.mark.parametrize("chunk_bytes", [1 << 24, 7], ids=["one_chunk", "tiny_chunks"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_index_matches_naive_reader(tmp_path, monkeypatch, case, chunk_bytes):
    monkeypatch.setattr(data, "_CHUNK_BYTES", chunk_bytes)
    raw = CASES[case]
    prompts = PromptFile(write(tmp_path, raw))
    expected = naive_prompts(raw)
    assert len(prompts) == len(expected)
    assert [prompts[i] for i in range(len(prompts))] == expected
    assert prompts.starts.dtype == np.int64 and prompts.ends.dtype == np.int64


def test_random_file_matches_naive_reader(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_CHUNK_BYTES", 64)
    rng = np.random.default_rng(0)
    alphabet = list("ab c\t\r\n") + ["\u00e9", "\u3000", "\u00a0", "\u732b", "\U0001f98a"]
    raw = "".join(rng.choice(alphabet, size=3000)).encode()
    prompts = PromptFile(write(tmp_path, raw))
    assert [prompts[i] for i in range(len(prompts))] == naive_prompts(raw)


def test_whitespace_tables_match_str_strip():
    spaces = {chr(c).encode() for c in range(0x80, sys.maxunicode + 1)
              if not 0xD800 <= c < 0xE000 and chr(c).isspace()}
    assert spaces == set(data._UNICODE_SPACES)
    ascii_spaces = {c for c in range(0x80) if chr(c).isspace()}
    assert ascii_spaces == set(np.flatnonzero(data._ASCII_SPACE).tolist())


def test_len_and_indexing(tmp_path):
    prompts = PromptFile(write(tmp_path, b"a\n\nb\nc\n"))
    assert len(prompts) == 3
    assert prompts[-1] == "c"
    with pytest.raises(IndexError):
        prompts[3]


@pytest.mark.parametrize("chunk_bytes", [1 << 24, 5], ids=["one_chunk", "tiny_chunks"])
@pytest.mark.parametrize(
    ("raw", "line", "offset"),
    [
        (b"\xffbad first\nok\n", 1, 0),
        (b"ok\n\nfine\nbad \xfe here\nafter\n", 4, 13),
        (b"ok\r\nstill ok\r\ntruncated \xe2\x82", 3, 24),
        ("caf\u00e9\n".encode() + b"\xc3\x28\n", 2, 6),
    ],
    ids=["first_line", "middle", "truncated_at_eof", "bad_continuation"],
)
def test_bad_utf8_names_line_and_offset(tmp_path, monkeypatch, chunk_bytes, raw, line, offset):
    monkeypatch.setattr(data, "_CHUNK_BYTES", chunk_bytes)
    path = write(tmp_path, raw)
    with pytest.raises(UserError) as err:
        PromptFile(path)
    message = str(err.value)
    assert str(path) in message
    assert f"line {line} " in message and f"byte offset {offset}:" in message
    assert "re-save the file as UTF-8" in message


@pytest.mark.parametrize("raw", [b"", b"\n\n", b" \r\n\t\n", "\ufeff".encode(),
                                 "\u3000\n".encode()],
                         ids=["empty", "newlines", "whitespace", "bom_only", "unicode_space"])
def test_file_without_prompts_is_a_user_error(tmp_path, raw):
    with pytest.raises(UserError, match="no prompts"):
        PromptFile(write(tmp_path, raw))


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        PromptFile(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="does not exist"):
        PromptFile(tmp_path)


def test_file_changed_after_indexing_is_a_user_error(tmp_path):
    path = write(tmp_path, b"a\nb\n")
    prompts = PromptFile(path)
    path.write_bytes(b"a\nb\nc\n")
    with pytest.raises(UserError, match="changed size"):
        prompts[0]


def test_prompt_file_pickles_for_spawned_workers(tmp_path):
    prompts = PromptFile(write(tmp_path, b"one\ntwo\n"))
    assert prompts[1] == "two"  # opens the mmap
    clone = pickle.loads(pickle.dumps(prompts))
    assert [clone[0], clone[1]] == ["one", "two"]


def test_load_prompt_list(tmp_path):
    assert load_prompt_list(write(tmp_path, b"x\r\n\r\n y \n")) == ["x", "y"]
    with pytest.raises(UserError, match="line 2"):
        load_prompt_list(write(tmp_path, b"x\n\x80\n", "bad.txt"))


# ---------------------------------------------------------------- sampler


def rank_batches(n: int, batch: int, world: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """batches[rank][step] for one epoch."""
    samplers = [ResumableSampler(n, batch, r, world, seed) for r in range(world)]
    return [list(s.iter_batches(epoch)) for s in samplers]


def test_sampler_is_a_seeded_permutation_per_epoch():
    sampler = ResumableSampler(10, 2, 0, 1, seed=5)
    assert sampler.batches_per_epoch == 5 and sampler.epoch == 0
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(5)).tolist()
    assert list(sampler) == expected
    again = ResumableSampler(10, 2, 0, 1, seed=5)
    assert list(again) == expected
    sampler.load_state_dict({"epoch": 1, "position": 0})
    epoch1 = list(sampler)
    assert epoch1 != expected and sorted(epoch1) == list(range(10))
    assert len(sampler) == 10


def test_rank_shards_are_disjoint_full_batches():
    n, batch, world = 103, 4, 3
    shards = rank_batches(n, batch, world, seed=1, epoch=2)
    steps = n // (batch * world)
    assert all(len(batches) == steps for batches in shards)
    assert all(len(b) == batch for batches in shards for b in batches)
    for step in range(steps):
        assert len({i for r in range(world) for i in shards[r][step]}) == batch * world
    every = [i for batches in shards for b in batches for i in b]
    assert len(set(every)) == len(every) == steps * batch * world


def test_sampler_resumes_at_position():
    full = ResumableSampler(50, 3, 1, 2, seed=9)
    full.load_state_dict({"epoch": 4, "position": 0})
    whole = list(full)
    resumed = ResumableSampler(50, 3, 1, 2, seed=9)
    resumed.load_state_dict({"epoch": 4, "position": 5})
    assert resumed.state_dict() == {"epoch": 4, "position": 5}
    assert list(resumed) == whole[5 * 3:]
    assert len(resumed) == len(whole) - 15


def test_sampler_state_rolls_over_and_rejects_foreign_state():
    sampler = ResumableSampler(20, 2, 0, 2, seed=0)  # 5 batches per epoch
    sampler.load_state_dict({"epoch": 3, "position": 5})
    assert sampler.state_dict() == {"epoch": 4, "position": 0}
    with pytest.raises(UserError, match="batches per epoch"):
        sampler.load_state_dict({"epoch": 0, "position": 6})


def test_sampler_needs_one_global_batch():
    with pytest.raises(UserError, match="fewer than one global batch"):
        ResumableSampler(7, 4, 0, 2, seed=0)


# ---------------------------------------------------------------- PromptStream


@pytest.fixture
def prompt_file(tmp_path) -> PromptFile:
    lines = [f"prompt number {i}" + ("\r" if i % 3 == 0 else "") for i in range(23)]
    return PromptFile(write(tmp_path, ("\n\n".join(lines)).encode()))


def test_stream_serves_rank_batches_across_epochs(prompt_file):
    # 23 prompts, 2 per rank x 2 ranks: 5 batches per epoch, 3 prompts dropped per epoch.
    streams = [PromptStream(prompt_file, 2, r, 2, seed=3) for r in range(2)]
    for epoch in range(3):
        for step in range(5):
            got = [s.next_batch() for s in streams]
            assert all(len(b) == 2 for b in got)
            assert len(set(got[0]) | set(got[1])) == 4
            expected = rank_batches(23, 2, 2, seed=3, epoch=epoch)[1][step]
            assert got[1] == [prompt_file[i] for i in expected]
        assert streams[0].epoch == epoch + 1
        assert streams[0].state_dict() == {"epoch": epoch + 1, "position": 0}


@pytest.mark.parametrize(("workers_before", "workers_after"), [(0, 0), (2, 2), (2, 0), (0, 2)])
def test_restored_stream_yields_the_same_future_batches(prompt_file, workers_before, workers_after):
    original = PromptStream(prompt_file, 2, 1, 2, seed=11, num_workers=workers_before)
    for _ in range(7):  # into epoch 1, with workers prefetching ahead
        original.next_batch()
    state = original.state_dict()
    assert state == {"epoch": 1, "position": 2}
    restored = PromptStream(prompt_file, 2, 1, 2, seed=11, num_workers=workers_after)
    restored.load_state_dict(pickle.loads(pickle.dumps(state)))
    ahead = [original.next_batch() for _ in range(9)]  # crosses into epoch 2
    assert [restored.next_batch() for _ in range(9)] == ahead
    assert restored.state_dict() == original.state_dict() == {"epoch": 3, "position": 1}


def test_load_state_dict_rewinds_a_running_stream(prompt_file):
    stream = PromptStream(prompt_file, 2, 0, 1, seed=0, num_workers=2)
    stream.next_batch()
    state = stream.state_dict()
    following = [stream.next_batch() for _ in range(4)]
    stream.load_state_dict(state)
    assert [stream.next_batch() for _ in range(4)] == following


# ---------------------------------------------------------------- sample prompts and seeds


def test_sample_prompts():
    assert len(SAMPLE_PROMPTS) == len(set(SAMPLE_PROMPTS)) == 8
    assert all(p == p.strip() and p for p in SAMPLE_PROMPTS)


def test_prompt_seed_is_stable():
    assert prompt_seed("a red fox", 0) == 1685863013
    assert prompt_seed("a red fox", 2**31 - 1) == 1685863012
    digest = hashlib.sha256("猫".encode()).digest()
    assert prompt_seed("猫", 7) == (7 + int.from_bytes(digest[:4], "big")) % 2**31
    assert all(0 <= prompt_seed(p, 123456789) < 2**31 for p in SAMPLE_PROMPTS)
