# Tests for the vision side of the data path: image -> ImageProcessor -> EvaViT (vision tower) -> ln_vision -> ...
# Tiny configs keep them fast; the full-size tower is only built on the meta device to count its parameters.
import dataclasses
import math

import pytest
import torch
from PIL import Image

from tinygptv.config import VisionConfig
from tinygptv.data.image_processor import ImageProcessor
from tinygptv.model.vision import VISION_TOWERS, EvaViT, adapt_state_dict, build_vision_tower, interpolate_pos_embed

TINY = VisionConfig(image_size=28, patch_size=7, width=32, depth=2, heads=2, mlp_dim=64, pretrain_image_size=28)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial values everywhere (q/v biases and LayerNorm affines start at 0/1), so every formula is exercised."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("image_size,tokens", [(28, 1 + 16), (56, 1 + 64)])
def test_output_shape(image_size, tokens):
    cfg = dataclasses.replace(TINY, image_size=image_size)
    model = build_vision_tower(cfg)
    assert isinstance(model, EvaViT)
    assert model.num_tokens == tokens and model.num_features == 32
    out = model(torch.randn(3, 3, image_size, image_size))
    assert out.shape == (3, tokens, 32)


def test_wrong_image_size_is_rejected():
    with pytest.raises(ValueError, match="28x28"):
        EvaViT(TINY)(torch.randn(1, 3, 56, 56))


def test_registry_unknown_name():
    assert "eva_vit_g" in VISION_TOWERS
    with pytest.raises(KeyError, match="eva_vit_g"):
        build_vision_tower(dataclasses.replace(TINY, name="eva_vit_h"))


def _reference_forward(model: EvaViT, pixels: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """EVA forward written from the formulas, sharing only the parameter tensors with the module under test."""
    p = cfg.patch_size
    b, _, s, _ = pixels.shape
    g = s // p
    # Patchify by hand: patch (i, j) flattened as (channel, row, col), matching Conv2d weight layout.
    patches = pixels.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p)
    conv_w = model.patch_embed.proj.weight.reshape(cfg.width, -1)
    x = patches @ conv_w.T + model.patch_embed.proj.bias
    x = torch.cat([model.cls_token.expand(b, 1, cfg.width), x], dim=1) + model.pos_embed

    def layer_norm(t, ln):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + cfg.layer_norm_eps) * ln.weight + ln.bias

    d = cfg.width // cfg.heads
    for blk in model.blocks:
        h = layer_norm(x, blk.norm1)
        wq, wk, wv = blk.attn.qkv.weight.split(cfg.width, dim=0)
        q = h @ wq.T + blk.attn.q_bias
        k = h @ wk.T  # no key bias
        v = h @ wv.T + blk.attn.v_bias
        heads = lambda t: t.reshape(b, -1, cfg.heads, d).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, -1, cfg.width)
        x = x + o @ blk.attn.proj.weight.T + blk.attn.proj.bias
        h = layer_norm(x, blk.norm2)
        h = h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
        x = x + h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    return x


def test_forward_matches_reference():
    model = _randomize(EvaViT(TINY)).eval()
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = model(pixels)
        ref = _reference_forward(model, pixels, TINY)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bf16_module_accepts_fp32_pixels():
    model = _randomize(EvaViT(TINY)).to(torch.bfloat16)
    out = model(torch.randn(1, 3, 28, 28))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_state_dict_keys_match_lavis_names():
    keys = set(EvaViT(TINY).state_dict())
    expected = {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed"}
    for i in range(TINY.depth):
        expected |= {f"blocks.{i}.{name}" for name in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.proj.weight",
            "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
            "mlp.fc2.bias")}
    assert keys == expected


def test_interpolate_pos_embed():
    pos = torch.randn(1, 1 + 16, 32)
    out = interpolate_pos_embed(pos, 8)
    assert out.shape == (1, 1 + 64, 32)
    assert torch.equal(out[:, 0], pos[:, 0])
    torch.testing.assert_close(interpolate_pos_embed(pos, 4), pos, atol=1e-6, rtol=0)
    # A constant grid stays constant (bicubic weights sum to 1), and the corner value moves to the corner.
    const = torch.cat([torch.zeros(1, 1, 32), torch.full((1, 16, 32), 3.0)], dim=1)
    torch.testing.assert_close(interpolate_pos_embed(const, 8)[:, 1:], torch.full((1, 64, 32), 3.0))
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.randn(1, 1 + 15, 32), 4)


def test_checkpoint_from_28px_loads_into_56px_model():
    small = _randomize(EvaViT(TINY))
    sd = small.state_dict()
    # Like eva_vit_g.pth (40 blocks for a 39-block tower): an extra block must be dropped, not loaded.
    sd_extra = dict(sd, **{k.replace("blocks.1.", "blocks.2."): v for k, v in sd.items() if k.startswith("blocks.1.")})
    cfg56 = dataclasses.replace(TINY, image_size=56)
    big = EvaViT(cfg56)
    big.load_state_dict(adapt_state_dict(sd_extra, cfg56), strict=True)
    torch.testing.assert_close(big.pos_embed.data, interpolate_pos_embed(sd["pos_embed"], 8), atol=0, rtol=0)
    torch.testing.assert_close(big.blocks[1].attn.qkv.weight.data, sd["blocks.1.attn.qkv.weight"], atol=0, rtol=0)
    assert sd_extra["pos_embed"].shape == (1, 17, 32)  # input left untouched
    assert big(torch.randn(1, 3, 56, 56)).shape == (1, 65, 32)


def test_full_size_parameter_count():
    with torch.device("meta"):
        model = EvaViT(VisionConfig())
    # patch embed 3*14*14*1408 + 1408 = 829,312; cls 1,408; pos_embed 257*1408 = 361,856; 39 blocks x 25,248,768.
    assert sum(p.numel() for p in model.blocks[0].parameters()) == 25_248_768
    assert sum(p.numel() for p in model.parameters()) == 985_894_528
    assert model.num_tokens == 257 and model.num_features == 1408


# --- image processor ------------------------------------------------------------------------------------------------


def test_processor_shape_dtype_and_batching(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (50, 30), (10, 20, 30)).save(path)
    proc = ImageProcessor(TINY)
    single = proc(path)
    assert single.shape == (1, 3, 28, 28) and single.dtype == torch.float32
    batch = proc([str(path), Image.new("L", (9, 9), 128), Image.new("RGBA", (5, 70))])
    assert batch.shape == (3, 3, 28, 28) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[0], single[0], atol=0, rtol=0)


def test_processor_uniform_colour_exact_normalisation():
    colour = (200, 17, 96)
    out = ImageProcessor(TINY)(Image.new("RGB", (33, 61), colour))[0]
    for c in range(3):
        expected = (torch.tensor(float(colour[c]), dtype=torch.float32) / 255.0
                    - torch.tensor(TINY.mean[c], dtype=torch.float32)) / torch.tensor(TINY.std[c], dtype=torch.float32)
        assert torch.equal(out[c], torch.full((28, 28), expected.item()))


def test_processor_squashes_without_cropping():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red, right half blue
    out = ImageProcessor(TINY)(image)[0]
    red, blue = out[0], out[2]
    left, right = slice(0, 12), slice(16, 28)  # away from the blurred seam at column 14
    assert (red[:, left] > blue[:, left]).all() and (blue[:, right] > red[:, right]).all()
    # A centre crop to a square would have shown only the middle 20x20 (half red, half blue); the squash keeps the
    # full width, so column 0 and column 27 are pure red and pure blue.
    proc = ImageProcessor(TINY)
    pure_red = proc(Image.new("RGB", (28, 28), (255, 0, 0)))[0]
    pure_blue = proc(Image.new("RGB", (28, 28), (0, 0, 255)))[0]
    torch.testing.assert_close(out[:, :, 0], pure_red[:, :, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, :, 27], pure_blue[:, :, 27], atol=1e-6, rtol=0)


def test_processor_errors(tmp_path):
    proc = ImageProcessor(TINY)
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        proc(missing)
    bad = tmp_path / "notes.jpg"
    bad.write_text("not pixels")
    with pytest.raises(ValueError, match=r"notes\.jpg: not an image in a supported format \(PNG, JPEG"):
        proc([bad])
