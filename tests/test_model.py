# The composite model's invariants: splicing puts image embeddings at the placeholder, labels cover exactly the answer,
# the KV-cache path equals the full forward, batching with left padding changes nothing, dimensions come from config.
from __future__ import annotations

import dataclasses

import pytest
import torch

from tinygptv.config import TinyGPTVConfig, preset
from tinygptv.data.templates import single_prompt
from tinygptv.model.tinygptv import IGNORE_INDEX, TinyGPTV
from tinygptv.checkpoint.native import load_pretrained


def _images(model, n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, d = model.config.qformer.num_query_tokens, model.config.llm.hidden_size
    return torch.randn(n, q, d, generator=g)


def test_image_embeddings_land_at_the_placeholder(model):
    images = _images(model)
    inputs = model.build_inputs(["ab<ImageHere>cd"], images, add_bos=True)
    row = inputs.inputs_embeds[0]
    q = images.shape[1]
    start = 1 + len(model.tokenize("ab"))  # BOS, then "ab"
    assert torch.equal(row[start:start + q], images[0])
    assert torch.equal(row[0], model.embed_ids([model.config.llm.bos_token_id])[0])
    assert torch.equal(row[start + q:], model.embed_ids(model.tokenize("cd")))
    assert row.shape[0] == 1 + 2 + q + 2


def test_two_images_in_order_and_count_checked(model):
    a, b = _images(model, seed=1)[0], _images(model, seed=2)[0]
    inputs = model.build_inputs(["<ImageHere>x<ImageHere>"], [torch.stack([a, b])], add_bos=False)
    q = a.shape[0]
    assert torch.equal(inputs.inputs_embeds[0, :q], a)
    assert torch.equal(inputs.inputs_embeds[0, q + 1:], b)
    with pytest.raises(ValueError, match="1 <ImageHere> placeholder"):
        model.build_inputs(["one <ImageHere> only"], [torch.stack([a, b])])


def test_labels_cover_exactly_the_answer_span(model):
    prompts = [single_prompt("stage3", "q?"), single_prompt("stage3", "a longer question?")]
    answers = ["yes", "a red circle"]
    inputs = model.build_inputs(prompts, _images(model, 2), answers, add_bos=True, padding_side="right")
    q = model.config.qformer.num_query_tokens
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        before, after = prompt.split("<ImageHere>")
        prompt_len = 1 + len(model.tokenize(before)) + q + len(model.tokenize(after))
        answer_ids = model.tokenize(answer + "###")
        labels = inputs.labels[i].tolist()
        assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert labels[prompt_len:prompt_len + len(answer_ids)] == answer_ids
        assert set(labels[prompt_len + len(answer_ids):]) <= {IGNORE_INDEX}
        real = prompt_len + len(answer_ids)
        assert inputs.attention_mask[i].tolist() == [1] * real + [0] * (inputs.labels.shape[1] - real)
        # the answer's embeddings are those of its tokens
        assert torch.equal(inputs.inputs_embeds[i, prompt_len:real], model.embed_ids(answer_ids))


def test_answer_is_cut_at_max_txt_len(model):
    model.config.prompt.max_txt_len = 5
    inputs = model.build_inputs(["<ImageHere>"], _images(model), ["a very long answer"], add_bos=False)
    kept = [t for t in inputs.labels[0].tolist() if t != IGNORE_INDEX]
    assert kept == model.tokenize("a very long answer###")[:5]


def test_loss_is_the_mean_over_answer_tokens(model):
    images = _images(model)
    prompt = single_prompt("stage3", "q?")
    inputs = model.build_inputs([prompt], images, ["no"], add_bos=True)
    with torch.no_grad():
        logits = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits
        loss = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                         labels=inputs.labels).loss
    labels = inputs.labels[0, 1:]
    keep = labels != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[0, :-1][keep], labels[keep])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert keep.sum() == len(model.tokenize("no###"))


def test_kv_cache_decoding_equals_full_forward(model):
    images = _images(model)
    inputs = model.build_inputs([single_prompt("stage3", "hello?")], images, add_bos=True, padding_side="left")
    with torch.no_grad():
        out = model.llm.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                                 max_new_tokens=8, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=256, eos_token_id=None)
        tokens = out.sequences[0]
        assert tokens.shape[0] == 8
        full = torch.cat([inputs.inputs_embeds[0], model.embed_ids(tokens.tolist())])[None]
        logits = model.llm(inputs_embeds=full).logits[0]
    start = inputs.inputs_embeds.shape[1] - 1
    cached = torch.stack(out.logits)[:, 0]  # [steps, V]
    assert torch.allclose(cached, logits[start:start + 8], atol=1e-4)
    assert torch.equal(cached.argmax(-1), tokens)


def test_batched_left_padded_generation_equals_one_by_one(model):
    prompts = [single_prompt("stage3", "q?"), single_prompt("stage3", "a much longer question here?")]
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    together = model.generate(pixels, prompts, max_new_tokens=6, stop_strings=[])
    alone = [model.generate(pixels[i:i + 1], prompts[i:i + 1], max_new_tokens=6, stop_strings=[])[0]
             for i in range(2)]
    assert together == alone


def test_seeded_sampling_is_reproducible(model):
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    prompt = [single_prompt("stage3", "q?")]
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(model.generate(pixels, prompt, max_new_tokens=8, temperature=1.5,
                                   stop_strings=[]))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize("settings", [dict(num_beams=3), dict(temperature=0.2, top_p=0.9),
                                      dict(repetition_penalty=1.05)])
def test_beam_search_and_sampling_stop_at_the_end_symbol(trained_dir, colour_images, settings):
    from tinygptv.data.image_processor import ImageProcessor

    model = load_pretrained(trained_dir)
    pixels = ImageProcessor(model.config.vision)([colour_images["red"], colour_images["blue"]])
    prompt = single_prompt("stage3", "what colour is it?")
    torch.manual_seed(0)
    assert model.generate(pixels, [prompt, prompt], max_new_tokens=20, **settings) == ["red", "blue"]


def test_stop_string_ends_the_answer(trained_dir, colour_images):
    from tinygptv.data.image_processor import ImageProcessor

    model = load_pretrained(trained_dir)
    pixels = ImageProcessor(model.config.vision)([colour_images["red"], colour_images["blue"]])
    prompt = single_prompt("stage3", "what colour is it?")
    assert model.generate(pixels, [prompt, prompt], max_new_tokens=20) == ["red", "blue"]
    # without the stop string the model runs on past its trained end symbol
    raw = model.generate(pixels[:1], [prompt], max_new_tokens=6, stop_strings=[])[0]
    assert raw.startswith("red###")


def test_streaming_pieces_join_to_the_answer(trained_dir, colour_images):
    from tinygptv.data.image_processor import ImageProcessor
    from tinygptv.model.generation import GenerationSettings
    from tinygptv.model.streaming import stream_generate

    model = load_pretrained(trained_dir)
    pixels = ImageProcessor(model.config.vision)(colour_images["blue"])
    prompt = single_prompt("stage3", "what colour is it?")
    seen = []
    pieces = list(stream_generate(model, pixels, prompt, GenerationSettings(max_new_tokens=20), on_text=seen.append))
    assert "".join(pieces) == "blue"
    assert seen == pieces


def test_every_dimension_comes_from_the_config():
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, hidden_size=48, num_layers=3),
                              qformer=dataclasses.replace(cfg.qformer, num_query_tokens=5))
    model = TinyGPTV(cfg)
    assert len(model.llm.model.layers) == 3
    assert model.encode_image(torch.zeros(2, 3, 28, 28)).shape == (2, 5, 48)


def test_config_round_trip_and_unknown_field(tmp_path):
    cfg = preset("tinygptv-stage4")
    cfg.save(tmp_path / "c.json")
    assert TinyGPTVConfig.load(tmp_path / "c.json") == cfg
    bad = cfg.to_dict()
    bad["llm"]["hiden_size"] = 3
    with pytest.raises(ValueError, match=r"config\.llm: unknown field\(s\) \['hiden_size'\]"):
        TinyGPTVConfig.from_dict(bad)


def test_unknown_preset_and_tower_names_are_listed():
    with pytest.raises(KeyError, match="known: .*tinygptv-stage1"):
        preset("tinygptv-stage5")


def test_forward_loss_equals_the_full_logits_loss(model):
    """The answer-positions-only vocabulary projection gives the transformers loss over the full logits."""
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    prompts = [single_prompt("stage3", "q?"), single_prompt("stage3", "longer q?")]
    answers = ["yes", [("no###", True), ("<|endoftext|>###Human: again? ###Assistant: ", False), ("x###", True)]]
    with torch.no_grad():
        out = model(pixels, prompts, answers, return_logits=True)
        inputs = model.build_inputs(prompts, model.encode_image(pixels), answers, add_bos=True)
        reference = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                              labels=inputs.labels)
    assert torch.allclose(out.loss, reference.loss, atol=1e-6)
    assert torch.allclose(out.logits, reference.logits, atol=1e-6)
    # follow-up questions are not supervised: the loss counts only answer tokens
    assert (inputs.labels != IGNORE_INDEX).sum() == len(model.tokenize("yes###")) + len(model.tokenize("no###x###"))
