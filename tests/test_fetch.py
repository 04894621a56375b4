# Tests for `tinygptv fetch` without the internet: the LAVIS URL files come from a small HTTP server on 127.0.0.1
# (Range requests, and a connection it can cut midway), the Hub files from a Hugging Face cache built here and read
# with HF_HUB_OFFLINE. Names and revisions come from the package's table; stand-ins replace only sizes and hashes.
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import os
import re
import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch

from official_fixtures import Dims, write_official_set, write_phi2
from tinygptv.checkpoint import download, fetch_cli, release
from tinygptv.checkpoint.fetch import FETCH_RECORD, FetchError, fetch_file
from tinygptv.checkpoint.release import EVA_FILE, HF, RELEASES, Release, release_for_stage, requested_preset
from tinygptv.cli import main

# Sizes the release's derivations fit (EVA heads = width / 88, Q-Former heads = width / 64), so `fetch` converts the
# stand-ins with no head-count argument, exactly as it converts the real files.
RELEASE_SHAPED = Dims(vit_width=88, vit_heads=1, q_hidden=64, q_heads=1)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- a local file server: Range support, and a connection it can cut ------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the name http.server calls)
        server = self.server
        server.log.append((self.path, self.headers.get("Range")))
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = int(re.match(r"bytes=(\d+)-", self.headers["Range"]).group(1)) if self.headers["Range"] else 0
        if start >= len(data) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        cut = server.cut.pop(self.path, None)  # send only this many bytes, then drop the connection
        self.wfile.write(data[start:] if cut is None else data[start:start + cut])
        if cut is not None:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.cut, httpd.log = {}, {}, []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """TINYGPTV_CACHE and the Hugging Face cache in tmp, the Hub offline, retries without waiting."""
    import huggingface_hub.constants as hf

    monkeypatch.setenv("TINYGPTV_CACHE", str(tmp_path / "tinygptv-cache"))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(download, "RETRY_WAIT_S", 0.0)
    return tmp_path


def served(server, entry, data: bytes, **fields):
    """The table's entry, served from the local server under its own file name; sizes and hashes of the stand-in."""
    server.files[f"/{entry.filename}"] = data
    return dataclasses.replace(entry, url=f"{server.url}/{entry.filename}", **fields)


def stand_in(entry, data: bytes):
    """Keep the entry's name and revision; where the table records a size or sha256, use the stand-in's."""
    return dataclasses.replace(entry, size=len(data) if entry.size is not None else None,
                               sha256=sha256(data) if entry.sha256 is not None else None)


def put_in_hub_cache(root: Path, entry, data: bytes) -> str:
    """huggingface_hub's layout: models--owner--name/{blobs/<sha256>, snapshots/<commit>/<file> -> blob,
    refs/<revision> -> commit}. An abbreviated revision stands for a full commit that begins with it."""
    repo = root / f"models--{entry.repo_id.replace('/', '--')}"
    commit = entry.revision.ljust(40, "0")
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    if commit != entry.revision:
        (repo / "refs" / entry.revision).write_text(commit)
    blob = repo / "blobs" / sha256(data)
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / entry.filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    return commit


# --- URL files ----------------------------------------------------------------------------------------------------


def test_a_cut_connection_resumes_with_a_range_request_and_gives_the_right_bytes(cache, server):
    data = os.urandom(3 << 20)
    entry = served(server, EVA_FILE, data, size=len(data), sha256=sha256(data))
    server.cut[f"/{entry.filename}"] = 1_234_567
    fetched = fetch_file(entry, quiet=True)
    assert fetched.path.read_bytes() == data and fetched.sha256 == sha256(data)
    assert server.log == [("/eva_vit_g.pth", None), ("/eva_vit_g.pth", "bytes=1234567-")]
    assert not fetched.path.with_name("eva_vit_g.pth.part").exists()


def test_a_part_left_by_an_interrupted_run_is_resumed(cache, server):
    data = os.urandom(2 << 20)
    entry = served(server, EVA_FILE, data, size=len(data), sha256=sha256(data))
    part = release.downloads_dir() / "eva_vit_g.pth.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:700_000])
    assert fetch_file(entry, quiet=True).path.read_bytes() == data
    assert server.log == [("/eva_vit_g.pth", "bytes=700000-")]


def test_ctrl_c_keeps_the_part_and_exits_130_with_one_line(cache, server, monkeypatch, capsys):
    data = os.urandom(1 << 20)
    entry = served(server, EVA_FILE, data, size=len(data), sha256=sha256(data))
    only_eva = Release("tinygptv-stage3", 3, (entry,))
    monkeypatch.setattr(fetch_cli, "release_for_stage", lambda stage: only_eva)

    def interrupted_copy(response, part, mode, have, total, quiet):
        with open(part, mode) as f:
            f.write(response.read(4096))
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "_copy", interrupted_copy)
    assert main(["fetch", "--stage", "3", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err
    assert (release.downloads_dir() / "eva_vit_g.pth.part").read_bytes() == data[:4096]


def test_a_wrong_hash_is_refused_named_and_moved_aside(cache, server):
    data = os.urandom(300_000)
    wrong = served(server, EVA_FILE, data, size=len(data), sha256="0" * 64)
    with pytest.raises(FetchError) as error:
        fetch_file(wrong, quiet=True)
    moved = release.downloads_dir() / f"eva_vit_g.pth.bad-{sha256(data)[:8]}"
    assert wrong.url in str(error.value) and str(moved) in str(error.value) and sha256(data) in str(error.value)
    assert moved.read_bytes() == data
    assert sorted(p.name for p in release.downloads_dir().iterdir()) == [moved.name]  # nothing usable left
    right = dataclasses.replace(wrong, sha256=sha256(data))
    assert fetch_file(right, quiet=True).path.read_bytes() == data  # the next run downloads it anew
    assert len(server.log) == 2


# --- Hub files ----------------------------------------------------------------------------------------------------


def test_hub_files_come_from_the_cache_at_the_tables_revision(cache, capsys):
    checkpoint = release_for_stage(3).role("checkpoint")[0]
    data = b"stand-in for the stage-3 checkpoint"
    commit = put_in_hub_cache(cache / "hf-cache", checkpoint, data)
    fetched = fetch_file(stand_in(checkpoint, data))
    assert fetched.path.read_bytes() == data and fetched.commit == commit
    out = capsys.readouterr().out
    assert f"{checkpoint.repo_id}@{checkpoint.revision} is commit {commit}" in out
    assert sha256(data) in out and "unverified" in out  # the table has no sha256 for it: printed for reporting
    other = release_for_stage(2).role("checkpoint")[0]
    with pytest.raises(FetchError, match="TinyGPT-V_for_Stage2.pth: not in the local Hugging Face cache"):
        fetch_file(other, quiet=True)


def test_a_bad_hub_file_is_moved_aside_so_it_downloads_again(cache):
    shard = next(f for f in release_for_stage(3).files if f.filename == "model-00001-of-00002.safetensors")
    data = b"not the real shard"
    put_in_hub_cache(cache / "hf-cache", shard, data)
    with pytest.raises(FetchError, match=r"size 18 bytes, expected 4,995,584,424; sha256 .*moved aside"):
        fetch_file(shard, quiet=True)
    blobs = cache / "hf-cache" / "models--microsoft--phi-2" / "blobs"
    assert [p.name for p in blobs.iterdir()] == [f"{sha256(data)}.bad-{sha256(data)[:8]}"]
    link = cache / "hf-cache" / "models--microsoft--phi-2" / "snapshots" / shard.revision / shard.filename
    assert not link.is_symlink() and not link.exists()


# --- the whole command --------------------------------------------------------------------------------------------


def _phi2_folder(folder: Path, dims: Dims) -> Path:
    """A tiny Phi-2 folder in the Hub layout the table lists: two shards, index, config, tokenizer files."""
    from tinygptv.data.tokenizer import byte_level_tokenizer

    write_phi2(folder, dims, layout="split", shards=2)
    byte_level_tokenizer().backend_tokenizer.model.save(str(folder))  # vocab.json, merges.txt
    return folder


def test_fetch_converts_stand_ins_into_the_folder_ask_loads(cache, server, monkeypatch, capsys, colour_images):
    files = write_official_set(cache / "official", RELEASE_SHAPED, stage=3)
    phi2 = _phi2_folder(cache / "official" / "phi-2-hub", RELEASE_SHAPED)
    table = release_for_stage(3)
    entries = []
    for entry in table.files:
        if entry.kind == HF:
            source = files.official if entry.role == "checkpoint" else phi2 / entry.filename
            if not source.exists():
                assert entry.optional, entry.filename
                entries.append(entry)
                continue
            put_in_hub_cache(cache / "hf-cache", entry, source.read_bytes())
            entries.append(stand_in(entry, source.read_bytes()))
        else:
            data = Path(files.eva if entry.role == "eva" else files.blip2).read_bytes()
            entries.append(served(server, stand_in(entry, data), data))
    monkeypatch.setattr(fetch_cli, "release_for_stage",
                        lambda stage: Release(table.name, table.stage, tuple(entries)))

    assert main(["fetch", "--stage", "3"]) == 0
    out = capsys.readouterr().out
    model_dir = cache / "tinygptv-cache" / "models" / "tinygptv-stage3"
    assert (model_dir / FETCH_RECORD).is_file() and "tinygptv-stage3 is ready" in out
    config_sha = sha256((phi2 / "config.json").read_bytes())
    assert f"config.json: size {(phi2 / 'config.json').stat().st_size:,}, sha256 {config_sha}" in out
    requests = len(server.log)
    assert requests == 2  # eva and blip2, once each

    assert main(["fetch", "--stage", "3"]) == 0  # the second run reuses the folder: no request, no conversion
    assert "nothing to download" in capsys.readouterr().out and len(server.log) == requests
    shutil.rmtree(model_dir)
    assert main(["fetch", "--stage", "3", "--quiet"]) == 0  # the downloads are reused: converted again, no request
    assert (model_dir / FETCH_RECORD).is_file() and len(server.log) == requests

    from tinygptv.checkpoint.loading import load_model

    model = load_model("tinygptv-stage3", quiet=True, merge_lora=False)
    official = torch.load(files.official, weights_only=True)["model"]
    assert torch.equal(model.projector.llama_proj.weight, official["llama_proj.weight"])
    assert model.config.vision.image_size == 224 and model.config.vision.heads == 1
    assert main(["ask", "--model", "tinygptv-stage3", "--image", colour_images["red"], "--no-stream",
                 "--max-new-tokens", "2", "What is it?"]) == 0


def test_model_names_release_or_preset(cache, capsys):
    """--model tinygptv-stageN is the converted release (an error saying the fetch command when it is missing);
    preset:NAME asks for random weights; other preset names keep meaning random weights."""
    assert main(["ask", "--model", "tinygptv-stage2", "hello"]) == 2
    err = capsys.readouterr().err
    assert "`tinygptv fetch --stage 2`" in err and str(cache / "tinygptv-cache" / "models") in err
    assert requested_preset("tinygptv-stage2") is None
    assert requested_preset("preset:tinygptv-stage2") == "tinygptv-stage2"
    assert requested_preset("tiny") == "tiny" and requested_preset("some/folder") is None
    with pytest.raises(KeyError, match="unknown preset 'nope'"):
        requested_preset("preset:nope")
    assert main(["ask", "--model", "preset:tiny", "--max-new-tokens", "2", "--no-stream", "hello"]) == 0


def test_the_table_pins_every_file():
    """Every Hub file at a commit (full, or the abbreviation on record), every hash well formed, `verified` only with
    both a size and a hash, and the four stages sharing the same Phi-2, EVA and BLIP-2 entries."""
    shared = None
    for name in RELEASES:
        files = RELEASES[name].files
        for f in files:
            assert re.fullmatch(r"[0-9a-f]{7,40}", f.revision or "") if f.kind == HF else f.url.startswith("https://")
            assert f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256)
            assert f.verified == (f.size is not None and f.sha256 is not None) and f.licence
        assert [f.role for f in files].count("checkpoint") == 1
        rest = [f for f in files if f.role != "checkpoint"]
        assert shared in (None, rest)
        shared = rest


# --- convert's flags for what the shapes cannot say -------------------------------------------------------------


def test_convert_takes_head_counts_depth_and_alpha_from_the_command_line(tmp_path, capsys):
    files = write_official_set(tmp_path, stage=3)  # EVA 32 wide: not a multiple of 88, so no default head count
    argv = ["convert", "--official-ckpt", str(files.official), "--phi2", str(files.phi2), "--eva", str(files.eva),
            "--blip2", str(files.blip2), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "--vit-heads" in capsys.readouterr().err
    assert main([*argv, "--vit-heads", "2", "--qformer-heads", "2", "--vit-depth", "1", "--lora-alpha", "4"]) == 0
    from tinygptv.config import TinyGPTVConfig

    config = TinyGPTVConfig.load(tmp_path / "out" / "config.json")
    assert (config.vision.heads, config.qformer.num_heads, config.vision.depth, config.lora.alpha) == (2, 2, 1, 4)
