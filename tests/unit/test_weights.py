"""dmdr.weights: the manifest, fetch over real HTTP (and a fake Hugging Face endpoint), verify."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dmdr import weights
from dmdr.errors import UserError

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ servers
class _Server:
    """A loopback HTTP server over a dict of files; records the requests it got."""

    def __init__(self, files: dict[str, bytes], hub: bool = False):
        self.files, self.hub, self.requests = files, hub, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                outer.requests.append((self.command, self.path, self.headers.get("Authorization")))
                key = self.path.split("?")[0]
                parts = key.strip("/").split("/")
                if outer.hub and len(parts) > 4 and parts[2] == "resolve":  # /{owner}/{repo}/resolve/{rev}/{file}
                    key = "/" + "/".join(parts[:2] + parts[4:])
                data = outer.files.get(key)
                if data is None:
                    self.send_response(404)
                    if outer.hub:
                        self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(data) - start))
                if outer.hub:
                    self.send_header("X-Repo-Commit", "a" * 40)
                    self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.end_headers()
                if body:
                    self.wfile.write(data[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    files = {"/a.bin": b"A" * 1000, "/b.pt": b"B" * 500}
    s = _Server(files)
    yield s
    s.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(path: Path, entries: list[dict], default_groups=("rewards",)) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"default_groups": list(default_groups), "files": entries}))
    return path


# ------------------------------------------------------------------------------ manifest
def test_default_manifest_names_the_reference_weights():
    m = weights.load_manifest(REPO / "dmdr/assets/weights.yaml")
    assert m.default_groups == ("rewards",)
    assert set(m.groups) == {"rewards", "taesdxl", "sdxl-base", "dmd2-ode-init", "prompts", "fid"}
    by_name = {e.name: e for e in m.entries}
    assert by_name["Apple_CLIP-H-14-224.bin"].sources[0] == \
        "hf://apple/DFN5B-CLIP-ViT-H-14/open_clip_pytorch_model.bin"
    assert by_name["HPS_v2.1_compressed.pt"].sources[0] == "hf://xswu/HPSv2/HPS_v2.1_compressed.pt"
    assert [e.name for e in m.select(None)] == ["Apple_CLIP-H-14-224.bin", "HPS_v2.1_compressed.pt"]
    assert len(m.select(["all"])) == len(m.entries)
    assert "taesdxl" in {e.name for e in m.select(["taesdxl"])}  # where the trainer looks for it


@pytest.mark.parametrize("entry, message", [
    ({"name": "x", "group": "g", "sources": ["a"], "sha": "1"}, "unknown key(s) sha"),
    ({"name": "../x", "group": "g", "sources": ["a"]}, "'name' must be a relative path"),
    ({"name": "x", "group": "g", "sources": []}, "'sources' must be a non-empty list"),
    ({"name": "x", "group": "g", "sources": ["a"], "sha256": "abc"}, "'sha256' must be 64 hex"),
    ({"name": "x", "group": "all", "sources": ["a"]}, "'group' must be a name"),
    ({"name": "x", "group": "g", "sources": ["https://h/x"], "include": ["*.json"]}, "only applies to hf://"),
])
def test_manifest_errors_name_the_file_and_entry(tmp_path, entry, message):
    path = write_manifest(tmp_path / "m.yaml", [entry], default_groups=())
    with pytest.raises(UserError) as err:
        weights.load_manifest(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_unknown_group_lists_the_known_ones(tmp_path):
    m = weights.load_manifest(write_manifest(tmp_path / "m.yaml", [{"name": "x", "group": "rewards", "sources": ["a"]}]))
    with pytest.raises(UserError, match="Unknown weights group.*nope.*choose from rewards"):
        m.select(["nope"])
    assert weights.parse_groups("rewards, taesdxl") == ["rewards", "taesdxl"]
    assert weights.parse_groups("none") == [] and weights.parse_groups(None) is None


def test_hf_uri_forms():
    r = weights.HfRef.parse("hf://tianweiy/DMD2/model/sdxl/x.bin")
    assert (r.repo_id, r.repo_type, r.revision, r.path) == ("tianweiy/DMD2", None, None, "model/sdxl/x.bin")
    r = weights.HfRef.parse("hf://datasets/o/r@v1.0?include=*.json,unet/*")
    assert (r.repo_id, r.repo_type, r.revision, r.path, r.include) == ("o/r", "dataset", "v1.0", "", ("*.json", "unet/*"))
    with pytest.raises(UserError, match="not an hf:// URI"):
        weights.HfRef.parse("hf://only-owner")


# ------------------------------------------------------------------------------ fetch / verify
def test_fetch_http_places_records_and_skips_on_rerun(tmp_path, server):
    m = weights.load_manifest(write_manifest(tmp_path / "m.yaml", [
        {"name": "Apple_CLIP-H-14-224.bin", "group": "rewards", "sources": [f"{server.url}/a.bin"],
         "sha256": sha(b"A" * 1000), "size": 1000},
        {"name": "sub/HPS.pt", "group": "rewards", "sources": [f"{server.url}/b.pt"]},
        {"name": "other.bin", "group": "extra", "sources": [f"{server.url}/missing"]},
    ]))
    dest = tmp_path / "w"
    placed = weights.fetch_weights(m, dest, progress=False)
    assert placed == [dest / "Apple_CLIP-H-14-224.bin", dest / "sub/HPS.pt"]
    assert (dest / "sub/HPS.pt").read_bytes() == b"B" * 500
    assert not (dest / ".fetch-cache").exists() and not (dest / "other.bin").exists()
    lock = json.loads((dest / weights.LOCK_NAME).read_text())["entries"]
    assert lock["sub/HPS.pt"] == {"group": "rewards", "source": f"{server.url}/b.pt", "sha256": sha(b"B" * 500),
                                  "size": 500, "kind": "file"}
    n = len(server.requests)
    weights.fetch_weights(m, dest, progress=False)
    assert len(server.requests) == n  # intact entries are not downloaded again
    checks = weights.verify_weights(dest, m)
    assert [c.name for c in checks] == ["Apple_CLIP-H-14-224.bin", "sub/HPS.pt"] and not any(c.problem for c in checks)
    assert len(weights.verify_weights(dest)) == 2  # against the record alone


def test_wrong_checksum_names_the_file_and_places_nothing(tmp_path, server):
    m = weights.load_manifest(write_manifest(tmp_path / "m.yaml", [
        {"name": "HPS_v2.1_compressed.pt", "group": "rewards", "sources": [f"{server.url}/b.pt"], "sha256": "0" * 64}]))
    with pytest.raises(UserError) as err:
        weights.fetch_weights(m, tmp_path / "w", progress=False)
    assert "HPS_v2.1_compressed.pt" in str(err.value) and "Checksum mismatch" in str(err.value)
    assert not (tmp_path / "w/HPS_v2.1_compressed.pt").exists()
    m = weights.load_manifest(write_manifest(tmp_path / "m.yaml", [
        {"name": "HPS_v2.1_compressed.pt", "group": "rewards", "sources": [f"{server.url}/b.pt"], "size": 7}]))
    with pytest.raises(UserError, match="HPS_v2.1_compressed.pt: .* has 500 bytes, the manifest expects 7"):
        weights.fetch_weights(m, tmp_path / "w", progress=False)
    assert not (tmp_path / "w/HPS_v2.1_compressed.pt").exists()


def test_unreachable_source_falls_back_then_fails_naming_the_file(tmp_path, server, monkeypatch):
    monkeypatch.setattr("dmdr.fetch.time.sleep", lambda s: None)  # skip the backoff waits
    dead = "http://127.0.0.1:9/x.bin"  # discard port: connection refused
    m = weights.load_manifest(write_manifest(tmp_path / "m.yaml", [
        {"name": "a.bin", "group": "rewards", "sources": [dead, f"{server.url}/a.bin"]},
        {"name": "gone.bin", "group": "more", "sources": [dead, f"{server.url}/nope"]}]))
    weights.fetch_weights(m, tmp_path / "w", ["rewards"], progress=False)
    assert (tmp_path / "w/a.bin").read_bytes() == b"A" * 1000
    with pytest.raises(UserError) as err:
        weights.fetch_weights(m, tmp_path / "w", ["more"], progress=False)
    text = str(err.value)
    assert "gone.bin" in text and "no source worked" in text and "HTTP 404" in text and "127.0.0.1:9" in text


def test_unreachable_hub_is_named_as_such_not_as_a_missing_repository(tmp_path, monkeypatch):
    monkeypatch.setattr("dmdr.weights.time.sleep", lambda s: None)  # skip the backoff waits
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    m = weights.load_manifest(write_manifest(tmp_path / "m.yaml", [
        {"name": "x.bin", "group": "rewards", "sources": ["hf://owner/repo/x.bin"]}]))
    with pytest.raises(UserError) as err:
        weights.fetch_weights(m, tmp_path / "w", progress=False)
    text = str(err.value)
    assert "does not exist" not in text
    assert "the Hugging Face Hub cannot be reached" in text and "HF_ENDPOINT" in text and "mirror" in text


def test_local_file_and_folder_sources_and_tamper_detection(tmp_path):
    src = tmp_path / "src"
    (src / "taesdxl").mkdir(parents=True)
    (src / "taesdxl/config.json").write_text("{}")
    (src / "taesdxl/diffusion_pytorch_model.safetensors").write_bytes(b"x" * 64)
    (src / "p.txt").write_text("a prompt\n")
    m = weights.load_manifest(write_manifest(tmp_path / "m.yaml", [
        {"name": "taesdxl", "group": "rewards", "sources": [str(src / "taesdxl")]},
        {"name": "prompts.txt", "group": "rewards", "sources": [str(src / "p.txt")], "sha256": sha(b"a prompt\n")}]))
    dest = tmp_path / "w"
    weights.fetch_weights(m, dest, progress=False)
    assert (dest / "taesdxl/config.json").read_text() == "{}"
    assert weights.read_lock(dest)["taesdxl"]["kind"] == "folder"
    (dest / "taesdxl/config.json").write_text('{"changed": 1}')
    (dest / "prompts.txt").unlink()
    with pytest.raises(UserError) as err:
        weights.verify_weights(dest, m)
    assert "taesdxl: sha256" in str(err.value) and "prompts.txt: missing" in str(err.value)
    weights.fetch_weights(m, dest, progress=False)  # repairs both
    weights.verify_weights(dest, m)


def test_token_file_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN_FILE", raising=False)
    with pytest.raises(UserError, match="token file .*nope does not exist"):
        weights.hf_token(tmp_path / "nope")
    (tmp_path / "tok").write_text("hf_abc\n")
    monkeypatch.setenv("HF_TOKEN_FILE", str(tmp_path / "tok"))
    assert weights.hf_token() == "hf_abc"


# ------------------------------------------------------------------------------ hf:// and the CLI
def test_cli_fetches_hf_files_with_the_token_from_a_file(tmp_path):
    blob = b"clip weights" * 100
    hub = _Server({"/apple/DFN5B-CLIP-ViT-H-14/open_clip_pytorch_model.bin": blob}, hub=True)
    try:
        manifest = write_manifest(tmp_path / "m.yaml", [
            {"name": "Apple_CLIP-H-14-224.bin", "group": "rewards", "sha256": sha(blob),
             "sources": ["hf://apple/DFN5B-CLIP-ViT-H-14/open_clip_pytorch_model.bin"]},
            {"name": "missing.bin", "group": "other", "sources": ["hf://apple/DFN5B-CLIP-ViT-H-14/nope.bin"]}])
        (tmp_path / "token").write_text("hf_secretE2E\n")
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hfhome"), PYTHONPATH=str(REPO))
        cmd = [sys.executable, "-m", "dmdr.weights", "fetch", "--manifest", str(manifest), "--dest",
               str(tmp_path / "w"), "--hf-token-file", str(tmp_path / "token"), "--no-progress"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "w/Apple_CLIP-H-14-224.bin").read_bytes() == blob
        assert f"sha256:{sha(blob)}" in out.stdout
        downloads = [(verb, auth) for verb, path, auth in hub.requests if "/resolve/" in path]
        assert {verb for verb, _ in downloads} >= {"GET"} and {a for _, a in downloads} == {"Bearer hf_secretE2E"}
        assert "hf_secretE2E" not in out.stdout + out.stderr

        out = subprocess.run(cmd + ["--groups", "other"], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2
        assert "missing.bin" in out.stderr and "does not exist" in out.stderr

        verify = [sys.executable, "-m", "dmdr.weights", "verify", "--dest", str(tmp_path / "w")]
        out = subprocess.run(verify, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.startswith("OK\t"), out.stderr
    finally:
        hub.close()
