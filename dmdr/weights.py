"""Model weights from a manifest: `dmdr weights fetch|verify|list`.

A manifest (YAML, e.g. ``dmdr/assets/weights.yaml``, the default, shipped in the package) lists files and folders by the name they get in
the destination folder, the sources to try in order, an optional sha256 (files) and size, and a
group::

    default_groups: [rewards]
    files:
      - name: HPS_v2.1_compressed.pt
        group: rewards
        sources: [hf://xswu/HPSv2/HPS_v2.1_compressed.pt, s3://bucket/weights/HPS_v2.1_compressed.pt]
        sha256: null          # optional: 64 hex digits, single files only
        size: null            # optional: bytes
      - name: taesdxl
        group: taesdxl
        sources: [hf://madebyollin/taesdxl]   # hf://OWNER/REPO with no path: a repo snapshot
        include: ["*.json", "*.safetensors"]  # optional: hf:// snapshot file patterns

Sources are local paths and ``s3://``, ``http(s)://`` (through `dmdr.fetch`, with resume,
retries and atomic writes) and ``hf://[datasets/]OWNER/REPO[@REVISION][/PATH]`` (registered here).
`fetch_weights` places every entry atomically under the destination and records what it placed
in ``weights.lock.json``; `verify_weights` checks a folder against the manifest or that record.
The Hugging Face token is read from a file (``--hf-token-file``, ``$HF_TOKEN_FILE`` or the
BuildKit secret ``/run/secrets/hf_token``), never from the command line.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence
from urllib.parse import parse_qs, quote, urlparse

import yaml

from dmdr.errors import UserError
from dmdr.storage.hashio import sha256_file

if TYPE_CHECKING:  # dmdr.fetch loads boto3: only when something is fetched (`dmdr --help` stays fast)
    from dmdr.fetch import FetchContext

log = logging.getLogger("dmdr.weights")

LOCK_NAME = "weights.lock.json"
#: The manifest shipped with the package (the one the image is built from); the default of --manifest.
DEFAULT_MANIFEST = Path(__file__).resolve().parent / "assets" / "weights.yaml"
DEFAULT_SECRET = Path("/run/secrets/hf_token")
_ENTRY_KEYS = {"name", "group", "sources", "sha256", "size", "include"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# ------------------------------------------------------------------------------ manifest
@dataclass(frozen=True)
class WeightEntry:
    """One file or folder of a manifest.

    Attributes:
        name: relative path under the destination folder (e.g. ``Apple_CLIP-H-14-224.bin``).
        group: the group that selects it (``rewards``, ``taesdxl``, ...).
        sources: URIs or local paths, tried in order until one works.
        sha256: expected sha256 of a single file, or None.
        size: expected size in bytes (a file) or total bytes (a folder), or None.
        include: file patterns kept from an ``hf://`` repo snapshot (empty: all files).
    """

    name: str
    group: str
    sources: tuple[str, ...]
    sha256: str | None = None
    size: int | None = None
    include: tuple[str, ...] = ()


@dataclass(frozen=True)
class Manifest:
    """A parsed weights manifest: its entries in file order and the groups fetched by default."""

    path: Path
    entries: tuple[WeightEntry, ...]
    default_groups: tuple[str, ...]

    @property
    def groups(self) -> list[str]:
        return sorted({e.group for e in self.entries})

    def select(self, groups: Sequence[str] | None = None) -> list[WeightEntry]:
        """Entries of `groups` (None: the default groups; ``["all"]``: every entry)."""
        wanted = list(self.default_groups if groups is None else groups)
        if "all" in wanted:
            return list(self.entries)
        unknown = [g for g in wanted if g not in self.groups]
        if unknown:
            raise UserError(f"Unknown weights group(s) {', '.join(unknown)} for {self.path}: choose from "
                            f"{', '.join(self.groups)}, 'all' or 'none'.")
        return [e for e in self.entries if e.group in wanted]


def parse_groups(text: str | None) -> list[str] | None:
    """``"rewards,taesdxl"`` or ``"rewards taesdxl"`` -> list; ``"none"``/``""`` -> []; None -> None."""
    if text is None:
        return None
    groups = [g for g in re.split(r"[,\s]+", text.strip()) if g]
    return [] if groups in ([], ["none"]) else groups


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest; every problem is a `UserError` naming the file and entry."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"Weights manifest {path} not found: pass an existing file with --manifest.") from None
    except yaml.YAMLError as exc:
        raise UserError(f"Weights manifest {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("files"), list):
        raise UserError(f"Weights manifest {path}: expected a mapping with a 'files' list.")
    extra = set(raw) - {"files", "default_groups"}
    if extra:
        raise UserError(f"Weights manifest {path}: unknown top-level key(s) {', '.join(sorted(extra))} "
                        "(allowed: files, default_groups).")
    entries = tuple(_parse_entry(path, i, item) for i, item in enumerate(raw["files"]))
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"Weights manifest {path}: name(s) listed twice: {', '.join(dupes)}.")
    defaults = tuple(raw.get("default_groups") or ())
    known = {e.group for e in entries}
    missing = [g for g in defaults if g not in known]
    if missing:
        raise UserError(f"Weights manifest {path}: default_groups names unknown group(s) {', '.join(missing)}.")
    return Manifest(path, entries, defaults)


def _parse_entry(path: Path, index: int, item: Any) -> WeightEntry:
    where = f"Weights manifest {path}, files[{index}]"
    if not isinstance(item, dict):
        raise UserError(f"{where}: expected a mapping with name, group and sources.")
    where = f"{where} ({item.get('name', '?')})"
    extra = set(item) - _ENTRY_KEYS
    if extra:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(extra))} (allowed: {', '.join(sorted(_ENTRY_KEYS))}).")
    name, group, sources = item.get("name"), item.get("group"), item.get("sources")
    if not isinstance(name, str) or not name or name.startswith((".", "/")) or ".." in Path(name).parts:
        raise UserError(f"{where}: 'name' must be a relative path inside the destination (no '..', not hidden).")
    if not isinstance(group, str) or not group or group in ("all", "none"):
        raise UserError(f"{where}: 'group' must be a name other than 'all' and 'none'.")
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) and s for s in sources):
        raise UserError(f"{where}: 'sources' must be a non-empty list of URIs or paths.")
    sha = item.get("sha256")
    if sha is not None and not (isinstance(sha, str) and _SHA256.match(sha.lower())):
        raise UserError(f"{where}: 'sha256' must be 64 hex digits (or left out).")
    size = item.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise UserError(f"{where}: 'size' must be a number of bytes (or left out).")
    include = item.get("include") or []
    if not isinstance(include, list) or not all(isinstance(p, str) for p in include):
        raise UserError(f"{where}: 'include' must be a list of file patterns.")
    if include and not all(s.startswith("hf://") for s in sources):
        raise UserError(f"{where}: 'include' only applies to hf:// repo snapshots; drop it or the other sources.")
    return WeightEntry(name, group, tuple(sources), sha.lower() if sha else None, size, tuple(include))


# ------------------------------------------------------------------------------ hf://
@dataclass(frozen=True)
class HfRef:
    """A parsed ``hf://[datasets/|spaces/]OWNER/REPO[@REVISION][/PATH][?include=a,b]``."""

    repo_id: str
    repo_type: str | None
    revision: str | None
    path: str
    include: tuple[str, ...]

    @classmethod
    def parse(cls, uri: str) -> "HfRef":
        parsed = urlparse(uri)
        parts = [p for p in (parsed.netloc + parsed.path).split("/") if p]
        repo_type = None
        if parts and parts[0] in ("datasets", "spaces"):
            repo_type, parts = parts[0][:-1], parts[1:]
        if len(parts) < 2:
            raise UserError(f"'{uri}' is not an hf:// URI: use hf://OWNER/REPO[@REVISION][/PATH].")
        repo, _, revision = parts[1].partition("@")
        include = tuple(p for v in parse_qs(parsed.query).get("include", []) for p in v.split(",") if p)
        return cls(f"{parts[0]}/{repo}", repo_type, revision or None, "/".join(parts[2:]), include)


def hf_token(token_file: str | Path | None = None) -> str | None:
    """The Hugging Face token from `token_file`, ``$HF_TOKEN_FILE`` or the BuildKit secret file.

    None when there is none (huggingface_hub then uses ``$HF_TOKEN`` or a saved login).
    """
    candidates = [token_file, os.environ.get("HF_TOKEN_FILE"), DEFAULT_SECRET]
    for candidate in candidates:
        if not candidate:
            continue
        p = Path(candidate)
        if p.is_file():
            return p.read_text(encoding="utf-8").strip() or None
        if candidate is not DEFAULT_SECRET:
            raise UserError(f"Hugging Face token file {p} does not exist: fix --hf-token-file / $HF_TOKEN_FILE.")
    return None


_token_file: str | None = None  # see set_hf_token_file


def set_hf_token_file(path: str | Path | None) -> None:
    """Make hf:// downloads read the token from `path` (checked now: a wrong path fails early)."""
    global _token_file
    hf_token(path)
    _token_file = str(path) if path else None


def _hf_error_kind(exc: BaseException) -> str:
    """'missing', 'denied', 'offline' (the hub was not reached) or 'retry' for an exception
    raised by huggingface_hub."""
    from huggingface_hub import errors

    # no connection: the client raises LocalEntryNotFoundError, a subclass of EntryNotFoundError
    unreachable = tuple(getattr(errors, n) for n in ("LocalEntryNotFoundError", "OfflineModeIsEnabled")
                        if hasattr(errors, n))
    if isinstance(exc, unreachable):
        return "offline"
    missing = tuple(getattr(errors, n) for n in ("RepositoryNotFoundError", "RevisionNotFoundError",
                                                 "EntryNotFoundError", "RemoteEntryNotFoundError")
                    if hasattr(errors, n))
    if isinstance(exc, getattr(errors, "GatedRepoError", ())):
        return "denied"
    if isinstance(exc, missing):
        return "missing"
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status in (401, 403):
        return "denied"
    if status in (404, 410):
        return "missing"
    return "retry"


def _fetch_hf(uri: str, ctx: FetchContext) -> Path:
    """`dmdr.fetch` handler for hf:// URIs: one file, or a repo snapshot when the URI has no path."""
    from huggingface_hub import hf_hub_download, snapshot_download

    record = ctx.cached()
    if record and record.get("sha256") == ctx.sha256:
        return ctx.entry / record["name"]
    ref = HfRef.parse(uri)
    if ctx.sha256 and not ref.path:
        raise UserError(f"{uri} is a whole repository; a sha256 can only pin a single file: drop it.")
    staging = ctx.entry / "hf"  # huggingface_hub keeps partial downloads here and resumes them
    common = dict(repo_type=ref.repo_type, revision=ref.revision, token=hf_token(_token_file), local_dir=staging,
                  endpoint=os.environ.get("HF_ENDPOINT") or None)  # read now, not at import
    delay = 1.0
    for attempt in range(1, ctx.attempts + 1):
        try:
            if ref.path:
                got = Path(hf_hub_download(ref.repo_id, ref.path, **common))
            else:
                got = Path(snapshot_download(ref.repo_id, allow_patterns=list(ref.include) or None, **common))
            break
        except UserError:
            raise
        except Exception as exc:  # huggingface_hub raises many types; classify, never swallow silently
            kind = _hf_error_kind(exc)
            if kind == "missing":
                raise UserError(f"Cannot download {uri}: the repository, revision or file does not exist "
                                "(check the URI).") from None
            if kind == "denied":
                raise UserError(f"Cannot download {uri}: access denied; accept the model's terms on Hugging "
                                "Face and pass a token (BuildKit secret hf_token / --hf-token-file).") from None
            mirror = "or add an s3:// or https:// mirror source to the manifest"
            if kind == "offline" and os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
                raise UserError(f"Cannot download {uri}: HF_HUB_OFFLINE is set; unset it, {mirror}.") from None
            if attempt == ctx.attempts:
                why = "the Hugging Face Hub cannot be reached" if kind == "offline" else f"{type(exc).__name__}: {exc}"
                raise UserError(f"Cannot download {uri} after {attempt} tries ({why}); check the network or proxy "
                                f"(HF_ENDPOINT for a hub mirror), {mirror}; the partial download resumes next "
                                "time.") from None
            log.warning("Download of %s failed (%s); retrying in %.0fs.", uri, type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
    name = Path(ref.path).name if ref.path else ref.repo_id.split("/")[-1]
    if ref.path:
        if ctx.sha256:
            actual = sha256_file(got)
            if actual != ctx.sha256:
                got.unlink()
                raise UserError(f"Checksum mismatch for {uri}: expected sha256 {ctx.sha256}, got {actual}; "
                                "fix the source or the expected sha256.")
        os.replace(got, ctx.entry / name)
    else:
        shutil.rmtree(got / ".cache", ignore_errors=True)
        shutil.rmtree(ctx.entry / name, ignore_errors=True)
        os.replace(got, ctx.entry / name)
    shutil.rmtree(staging, ignore_errors=True)
    return ctx.commit(name, ref.revision)


def _fetch(uri: str, cache: Path, sha256: str | None, progress: bool | None) -> Path:
    """`dmdr.fetch.fetch`, with hf:// registered (imported here: it loads the S3 client)."""
    from dmdr.fetch import fetch, register_scheme

    register_scheme("hf", _fetch_hf)
    return fetch(uri, cache, sha256, progress=progress)


# ------------------------------------------------------------------------------ fetch / verify
def digest(path: Path) -> tuple[str, int]:
    """(sha256, bytes) of a file; for a folder, the sha256 of its sorted "relpath sha256" lines."""
    if path.is_file():
        return sha256_file(path), path.stat().st_size
    lines, total = [], 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        lines.append(f"{f.relative_to(path).as_posix()} {sha256_file(f)}\n")
        total += f.stat().st_size
    return hashlib.sha256("".join(lines).encode()).hexdigest(), total


def read_lock(dest: Path) -> dict[str, dict]:
    """The record of what `fetch_weights` placed in `dest` ({name: record}); {} when none."""
    try:
        return json.loads((dest / LOCK_NAME).read_text(encoding="utf-8"))["entries"]
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{dest / LOCK_NAME} is corrupt: delete it and run `dmdr weights fetch` again.") from None


def _write_lock(dest: Path, entries: dict[str, dict]) -> None:
    tmp = dest / f".{LOCK_NAME}.tmp"
    tmp.write_text(json.dumps({"entries": entries}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, dest / LOCK_NAME)


def _source_uri(entry: WeightEntry, source: str) -> str:
    if entry.include and source.startswith("hf://"):
        return f"{source}?include={quote(','.join(entry.include), safe='*,/.')}"
    return source


def _place(src: Path, target: Path, link: bool) -> None:
    """Put a copy (or, from our own cache, a hard link) of `src` at `target`, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp"
    _remove(tmp)

    def copy(a: str, b: str) -> None:
        if link:
            try:
                os.link(a, b)
                return
            except OSError:  # another filesystem (e.g. a BuildKit cache mount): copy
                pass
        shutil.copy2(a, b)

    if src.is_dir():
        shutil.copytree(src, tmp, copy_function=copy)
        _remove(target)  # os.replace cannot replace a non-empty folder
    else:
        copy(str(src), str(tmp))
    os.replace(tmp, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fetch_entry(entry: WeightEntry, dest: Path, cache: Path, progress: bool | None) -> dict:
    errors = []
    for source in entry.sources:
        try:
            got = _fetch(_source_uri(entry, source), cache, entry.sha256, progress)
        except UserError as exc:
            errors.append(str(exc))
            log.warning("%s: source %s failed: %s", entry.name, source, exc)
            continue
        if entry.sha256 and got.is_dir():
            raise UserError(f"Weights entry {entry.name}: {source} is a folder; a sha256 can only pin a "
                            "single file: drop 'sha256' from the manifest.")
        if entry.size is not None and _size(got) != entry.size:
            raise UserError(f"Weights entry {entry.name}: {source} has {_size(got)} bytes, the manifest "
                            f"expects {entry.size}: fix the source or the size in the manifest.")
        _place(got, dest / entry.name, link=cache in got.parents)
        sha, size = digest(dest / entry.name)
        return {"group": entry.group, "source": source, "sha256": sha, "size": size,
                "kind": "folder" if (dest / entry.name).is_dir() else "file"}
    raise UserError(f"Cannot fetch weights entry {entry.name} (group {entry.group}): no source worked: "
                    + " | ".join(errors))


def fetch_weights(manifest: Manifest, dest: str | Path, groups: Sequence[str] | None = None, *,
                  cache_dir: str | Path | None = None, progress: bool | None = None) -> list[Path]:
    """Download every entry of `groups` into `dest` (skipping entries already there and intact).

    Downloads go through `cache_dir` (default ``dest/.fetch-cache``, removed after a complete
    run; partial downloads in it resume next time). Returns the placed paths.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else dest / ".fetch-cache"
    lock = read_lock(dest)
    placed = []
    for entry in manifest.select(groups):
        target = dest / entry.name
        previous = lock.get(entry.name)
        if target.exists() and previous and _intact(entry, previous, target):
            log.info("%s: already present", entry.name)
        else:
            t0 = time.monotonic()
            lock[entry.name] = _fetch_entry(entry, dest, cache, progress)
            _write_lock(dest, lock)
            log.info("%s: %d bytes from %s in %.1fs", entry.name, lock[entry.name]["size"],
                     lock[entry.name]["source"], time.monotonic() - t0)
        placed.append(target)
    _write_lock(dest, lock)
    if not cache_dir:
        shutil.rmtree(cache, ignore_errors=True)
    return placed


def _intact(entry: WeightEntry, record: dict, target: Path) -> bool:
    if entry.sha256 and record.get("sha256") != entry.sha256:
        return False
    if not entry.sha256 and record.get("source") not in entry.sources:
        return False
    return digest(target)[0] == record.get("sha256")


@dataclass
class Check:
    """The result of verifying one entry: `problem` is None when it is fine."""

    name: str
    sha256: str | None
    size: int | None
    problem: str | None = None


def verify_weights(dest: str | Path, manifest: Manifest | None = None,
                   groups: Sequence[str] | None = None) -> list[Check]:
    """Check `dest` against `manifest` (sha256 where given, else the fetch record) or, without a
    manifest, against the fetch record alone. Raises `UserError` listing every problem."""
    dest = Path(dest)
    lock = read_lock(dest)
    if manifest is not None:
        wanted = {e.name: (e.sha256 or lock.get(e.name, {}).get("sha256"), e.size) for e in manifest.select(groups)}
    elif lock:
        wanted = {n: (r.get("sha256"), r.get("size")) for n, r in lock.items()
                  if groups is None or "all" in groups or r.get("group") in groups}
    else:
        raise UserError(f"No {LOCK_NAME} in {dest}: pass --manifest, or fetch with `dmdr weights fetch` first.")
    checks = []
    for name, (want_sha, want_size) in wanted.items():
        path = dest / name
        if not path.exists():
            checks.append(Check(name, None, None, "missing"))
            continue
        sha, size = digest(path)
        check = Check(name, sha, size)
        if want_sha and sha != want_sha:
            check.problem = f"sha256 {sha}, expected {want_sha}"
        elif want_size is not None and size != want_size:
            check.problem = f"{size} bytes, expected {want_size}"
        checks.append(check)
    bad = [c for c in checks if c.problem]
    if bad:
        raise UserError(f"Weights in {dest} failed verification: "
                        + "; ".join(f"{c.name}: {c.problem}" for c in bad)
                        + ". Fetch them again with `dmdr weights fetch`.")
    return checks


if __name__ == "__main__":  # `python -m dmdr.weights ...`, as the image's weights stage runs it
    from dmdr.weights_cli import main

    sys.exit(main())
