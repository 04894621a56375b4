# Our checkpoint format: bit-exact round trips (full and trainable-only on top of a base), atomic writes, named
# errors for bad files, and Hub ids resolved through huggingface_hub's offline cache.
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import tinygptv.checkpoint.native as native
from tinygptv.checkpoint.hub import ModelNotFoundError
from tinygptv.checkpoint.native import CheckpointError
from tinygptv.data.templates import single_prompt
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.checkpoint.native import load_pretrained, save_pretrained

from conftest import tiny_model


def _randomise(model: TinyGPTV, seed: int) -> TinyGPTV:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _same_state(a: TinyGPTV, b: TinyGPTV) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = _randomise(tiny_model(), 0)
    save_pretrained(model, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors", "tokenizer.json",
                                                  "tokenizer_config.json"]
    loaded = load_pretrained(tmp_path / "m")
    assert _same_state(model, loaded)
    assert loaded.config == model.config
    assert loaded.tokenizer("a<|endoftext|>").input_ids == model.tokenizer("a<|endoftext|>").input_ids
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == model.trainable_names()
    pixels, prompt = torch.randn(1, 3, 28, 28), [single_prompt("stage3", "q?")]
    assert torch.equal(model(pixels, prompt, ["a"], return_logits=True).logits,
                       loaded(pixels, prompt, ["a"], return_logits=True).logits)


def test_trainable_only_checkpoint_rebuilds_from_its_base(tmp_path):
    base = _randomise(tiny_model(), 1)
    save_pretrained(base, tmp_path / "base")
    tuned = load_pretrained(tmp_path / "base")
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.requires_grad:
                p.add_(1.0)
    save_pretrained(tuned, tmp_path / "tuned", trainable_only=True, base_model=str(tmp_path / "base"))
    stored = load_file(tmp_path / "tuned" / "model.safetensors")
    assert set(stored) == tuned.trainable_names()
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["base_model"] == str(tmp_path / "base")
    assert _same_state(tuned, load_pretrained(tmp_path / "tuned"))
    with pytest.raises(ValueError, match="needs base_model"):
        save_pretrained(base, tmp_path / "x", trainable_only=True)


def test_a_base_without_lora_feeds_a_model_with_lora(tmp_path):
    """peft renames X.weight to X.base_layer.weight; a stage-1 (no LoRA) base must still fill a LoRA model."""
    stage1 = tiny_model()
    stage1.config.lora.r = 0
    stage1 = _randomise(TinyGPTV(stage1.config, stage1.tokenizer), 2)
    assert not any("base_layer" in k for k in stage1.state_dict())
    save_pretrained(stage1, tmp_path / "s1")
    stage2 = tiny_model()
    save_pretrained(stage2, tmp_path / "s2", trainable_only=True, base_model=str(tmp_path / "s1"))
    loaded = load_pretrained(tmp_path / "s2")
    qkv = "llm.model.layers.0.self_attn.query_key_value"
    assert torch.equal(loaded.state_dict()[f"{qkv}.base_layer.weight"], stage1.state_dict()[f"{qkv}.weight"])
    assert torch.equal(loaded.state_dict()[f"{qkv}.lora_A.default.weight"],
                       stage2.state_dict()[f"{qkv}.lora_A.default.weight"])


def test_saving_again_keeps_the_model_card_and_a_readable_folder(tmp_path):
    """Re-exporting into a folder (as `make nano-model` does into the bundled model) replaces the weights, not the
    card the user wrote beside them; the folder and the weights get the umask's permissions, not mkdtemp's 0700
    and safetensors' 0600."""
    save_pretrained(_randomise(tiny_model(), 3), tmp_path / "m")
    (tmp_path / "m" / "README.md").write_text("# my model\n")
    second = _randomise(tiny_model(), 4)
    save_pretrained(second, tmp_path / "m")
    assert (tmp_path / "m" / "README.md").read_text() == "# my model\n"
    assert _same_state(load_pretrained(tmp_path / "m"), second)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "m" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    good = _randomise(tiny_model(), 3)
    save_pretrained(good, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def crash(tensors, path, metadata=None):
        open(path, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(native, "save_weights", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(_randomise(tiny_model(), 4), tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary folder left behind


@pytest.mark.parametrize("damage, message", [
    (lambda sd: sd.pop("projector.llama_proj.bias"), r"missing keys \(1\): projector\.llama_proj\.bias"),
    (lambda sd: sd.__setitem__("projector.extra", torch.zeros(1)), r"unexpected keys \(1\): projector\.extra"),
    (lambda sd: sd.__setitem__("projector.llama_proj.bias", torch.zeros(3)),
     r"wrong shapes \(1\): projector\.llama_proj\.bias: file \(3,\) vs model \(48,\)"),
])
def test_bad_weights_file_names_the_key(tmp_path, damage, message):
    save_pretrained(tiny_model(), tmp_path / "m")
    sd = load_file(tmp_path / "m" / "model.safetensors")
    damage(sd)
    save_file(sd, tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(tmp_path / "m")


def test_folder_without_config_is_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path / "empty")
    with pytest.raises(ModelNotFoundError, match="no such model folder"):
        load_pretrained(tmp_path / "missing")


def _hub_cache(root, repo_id: str, model_dir) -> None:
    """The layout huggingface_hub keeps: models--owner--name/{refs/main, snapshots/<commit>/files}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, repo / "snapshots" / commit)


def test_hub_id_loads_from_the_offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    model = _randomise(tiny_model(), 5)
    save_pretrained(model, tmp_path / "m")
    _hub_cache(tmp_path / "cache", "someone/tiny-tinygptv", tmp_path / "m")
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    assert _same_state(model, load_pretrained("someone/tiny-tinygptv"))
    with pytest.raises(ModelNotFoundError, match="someone/other: not a local folder, and the local Hugging Face "
                                                 "cache could not provide it"):
        load_pretrained("someone/other")


@pytest.mark.slow
def test_cli_reads_a_hub_id_from_the_cache_and_explains_an_unreachable_hub(tmp_path):
    save_pretrained(tiny_model(), tmp_path / "m")
    _hub_cache(tmp_path / "cache", "someone/tiny", tmp_path / "m")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    run = lambda *a: subprocess.run([sys.executable, "-m", "tinygptv.cli", *a], env=env, capture_output=True,
                                    text=True, timeout=120)
    ok = run("info", "--model", "someone/tiny", "--json")
    assert ok.returncode == 0, ok.stderr
    layers, d, r = 2, 64, 4  # tiny preset: LoRA A [r, D] + B [3D, r] on QKV, A [r, D] + B [D, r] on dense
    assert json.loads(ok.stdout)["parameters"]["lora"] == layers * (r * d + 3 * d * r + r * d + d * r)
    missing = run("info", "--model", "nobody/nothing")
    assert missing.returncode == 2
    assert "nobody/nothing: not a local folder" in missing.stderr and "HF_HUB_CACHE" in missing.stderr


def test_export_merges_lora_without_changing_outputs(tmp_path):
    from tinygptv.cli import main

    model = _randomise(tiny_model(), 6)
    save_pretrained(model, tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    merged = load_pretrained(tmp_path / "merged")
    assert merged.config.lora.r == 0
    assert not any("lora_" in k or "base_layer" in k for k in merged.state_dict())
    pixels, prompt = torch.randn(2, 3, 28, 28), [single_prompt("stage3", "q?")] * 2
    with torch.no_grad():
        assert torch.allclose(model(pixels, prompt, ["a", "b"], return_logits=True).logits,
                              merged(pixels, prompt, ["a", "b"], return_logits=True).logits, atol=1e-5)


def test_export_overlay_keeps_only_what_differs_from_the_base(tmp_path):
    from tinygptv.cli import main

    base = _randomise(tiny_model(), 7)
    save_pretrained(base, tmp_path / "base")
    tuned = load_pretrained(tmp_path / "base")
    with torch.no_grad():
        tuned.projector.llama_proj2.bias.add_(1.0)
        tuned.connector.query_tokens.mul_(2.0)
    save_pretrained(tuned, tmp_path / "tuned")
    assert main(["export", str(tmp_path / "tuned"), "--out", str(tmp_path / "small"),
                 "--overlay-on", str(tmp_path / "base")]) == 0
    assert set(load_file(tmp_path / "small" / "model.safetensors")) == {"projector.llama_proj2.bias",
                                                                       "connector.query_tokens"}
    assert _same_state(tuned, load_pretrained(tmp_path / "small"))


def test_missing_bundled_model_says_how_to_get_it(monkeypatch, tmp_path):
    import tinygptv.checkpoint.loading as loading

    monkeypatch.setitem(loading.BUNDLED, "tinygptv-nano", loading.Bundled(tmp_path / "absent", "a note"))
    with pytest.raises(FileNotFoundError, match="make nano-model"):
        loading.load_model("tinygptv-nano")
