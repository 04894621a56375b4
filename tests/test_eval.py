# The evaluation harness: VQA normalisation and every benchmark's two scores on hand-worked cases, the readers on
# files in each publisher's layout, box parsing / IoU / AUROC, candidate ranking and yes/no likelihood, end-to-end
# runs of all ten benchmarks on the tiny model, `eval score` reproducing them, and resume.
from __future__ import annotations

import argparse
import json

import pytest
import torch

import eval_fixtures as fx
from conftest import tiny_model
from tinygptv.eval import BENCHMARKS
from tinygptv.eval.base import Item
from tinygptv.eval.hm import auroc
from tinygptv.eval.refcoco import iou, official_iou, parse_box
from tinygptv.eval.scoring import load_predictions, score_file
from tinygptv.eval.vqa_normalize import normalize_answer, official_vqa_accuracy, tinygptv_vqa_accuracy, vqa_accuracy
from tinygptv.eval.cli import add_eval_parser
from tinygptv.eval.prompts import PROMPTS
from tinygptv.eval.runner import (
    Runner, candidate_losses, config_sha256, default_template, generate_shared_prefix, run_eval, template_for,
    yes_probability,
)
from tinygptv.model.generation import GenerationSettings

ALL = ("gqa", "vsr", "iconqa", "vizwiz", "hm", "okvqa", "refcoco", "refcoco+", "refcocog", "easyvqa")


def cli(argv: list[str]) -> int:
    """The eval sub-commands behind a parser of their own (tinygptv/cli.py registers the same functions)."""
    parser = argparse.ArgumentParser(prog="tinygptv")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def data_for(benchmark: str, tmp_path) -> str | None:
    return None if benchmark == "easyvqa" else str(fx.WRITERS[benchmark](tmp_path / "data"))


# --- normalisation and the metrics ------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, normalised", [
    ("two", "2"), ("2", "2"), ("Ten", "10"), ("none", "0"),
    ("a dog", "dog"), ("The dog", "dog"), ("an apple", "apple"),
    ("isn't", "isn't"), ("isnt", "isn't"), ("dont", "don't"),
    ("dog.", "dog"), ("Dog!", "dog"), ("yes !", "yes"), ("what?", "what"), ("2.5", "2.5"),
    ("", ""), ("   ", ""), ("Unanswerable.", "unanswerable"), ("unanswerable", "unanswerable"),
    ("1,000", "1000"), ("black/white", "black white"), ("t-shirt", "t shirt"), ("red\tcar\n", "red car"),
])
def test_vqa_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_vqa_accuracy_hand_cases():
    assert vqa_accuracy("dog", ["dog"] * 10) == 1.0
    # three matching answers: 7 of the 10 nine-answer subsets hold all three (1), 3 hold two (2/3) -> 0.9
    assert vqa_accuracy("Dog.", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("dog", ["dog"] * 2 + ["cat"] * 8) == pytest.approx(0.6)  # (2 * 1/3 + 8 * 2/3) / 10
    assert vqa_accuracy("dog", ["dog"] + ["cat"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("two", ["2"] * 10) == 1.0 and vqa_accuracy("2", ["two"] * 10) == 1.0
    assert vqa_accuracy("", ["yes"] * 10) == 0.0
    assert vqa_accuracy("a dog", ["dog"]) == 1.0  # one answer: exact match after normalisation
    # the official tool leaves unanimous answers untouched: "2" never equals "two" there
    assert official_vqa_accuracy("2", ["two"] * 10) == 0.0
    assert official_vqa_accuracy("two", ["2"] * 10) == 1.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_auroc_rank_based_with_ties():
    assert auroc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert auroc([0.5] * 4, [1, 0, 1, 0]) == 0.5
    assert auroc([0.9, 0.6, 0.2, 0.6], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert auroc([0.3, 0.4], [1, 1]) is None


def test_box_parsing_and_iou():
    assert parse_box("{<1><2><30><40>}") == (1, 2, 30, 40)
    assert parse_box("it is { <1> <2> <30> <40> } there") == (1, 2, 30, 40)
    assert parse_box("it is {<1><2><30><40>}", anchored=True) is None
    assert parse_box("{<1><2><30><40>}###Human", anchored=True) == (1, 2, 30, 40)
    assert parse_box("<p>dog</p> {<1><2><3>}") is None and parse_box("{<1000><2><3><4>}") is None
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([10, 10, 0, 0], [0, 0, 10, 10]) == 0.0  # an inverted box has no area
    assert official_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert official_iou([50, 50, 75, 100], [50, 50, 100, 100]) == pytest.approx(26 * 51 / (51 * 51))


# --- hand-worked scores for every benchmark, through `eval score` ----------------------------------------------------

@pytest.mark.parametrize("benchmark", sorted(fx.HAND_WORKED))
def test_hand_worked_scores(benchmark, tmp_path, capsys):
    preds, expected = fx.HAND_WORKED[benchmark]
    data = data_for(benchmark, tmp_path)
    path = tmp_path / "preds.jsonl"
    fx.write_jsonl(path, preds)
    assert cli(["eval", "score", "--benchmark", benchmark, "--data", data, "--predictions", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == len(preds) and summary["missing"] == summary["items"] - len(preds)
    for score, metrics in expected.items():
        for metric, value in metrics.items():
            assert summary["scores"][score][metric] == pytest.approx(value), (score, metric)
    assert all(len(h) == 64 for h in summary["files"].values())


def test_easyvqa_hand_worked(tmp_path, capsys):
    # the first three test questions: "what is the red shape?" triangle; "what is the color of the triangle?" red;
    # "what is the color of the shape?" red
    path = tmp_path / "preds.jsonl"
    fx.write_jsonl(path, [{"id": "0", "answer": "Triangle."}, {"id": "1", "answer": "a red one"},
                          {"id": "2", "raw": "blue###Human: red"}])  # raw only: parsed (cut at ###) for strict
    summary = score_file("easyvqa", None, path, limit=3)
    assert summary["items"] == 3 and summary["missing"] == 0
    assert summary["scores"]["strict"]["accuracy"] == pytest.approx(100 / 3)
    # compatible searches the whole raw text, as the official script did: "red" after ### counts
    assert summary["scores"]["tinygptv-compatible"]["accuracy"] == pytest.approx(100.0)
    assert cli(["eval", "score", "--benchmark", "easyvqa", "--predictions", str(path)]) == 0
    out = capsys.readouterr()
    assert "strict" in out.out and "tinygptv-compatible" in out.out and "9670 of 9673" in out.err


def test_score_rejects_unknown_ids(tmp_path):
    path = tmp_path / "preds.jsonl"
    fx.write_jsonl(path, [{"id": "nope", "answer": "x"}])
    with pytest.raises(ValueError, match="not items of gqa"):
        score_file("gqa", fx.gqa(tmp_path / "data"), path)


# --- readers on the publishers' layouts ----------------------------------------------------------------------------

def test_readers_follow_the_published_layouts(tmp_path):
    read = lambda name, **kw: BENCHMARKS[name].read(tmp_path / name, **kw)  # noqa: E731
    for name in ("gqa", "vsr", "iconqa", "vizwiz", "hm", "okvqa"):
        getattr(fx, name)(tmp_path / name)
    fx.refer(tmp_path / "refer")

    gqa = read("gqa")
    assert [it.id for it in gqa.items] == ["g1", "g2", "g3", "g4"] and gqa.items[0].image.endswith("images/n1.jpg")
    assert gqa.items[0].instruction == ("[vqa] Based on the image, respond to this question with a short answer: "
                                        "What color is the car?")
    vsr = read("vsr")  # images found in train2017/ or val2017/, as the official script looks
    assert vsr.items[1].image.endswith("val2017/000000000002.jpg") and [it.target for it in vsr.items] == [
        "true", "false", "true"]
    icon = read("iconqa")  # only the choose_txt val problems listed under choose_txt_val
    assert [it.id for it in icon.items] == ["p1", "p2", "p3"] and icon.items[0].candidates == ("3", "4", "5")
    assert icon.items[0].target == 1 and icon.items[0].image.endswith("iconqa/val/choose_txt/p1/image.png")
    viz = read("vizwiz")
    assert len(viz.items[0].target) == 10 and "reply 'unanswerable'" in viz.items[0].instruction
    hm = read("hm")
    assert hm.items[0].instruction == ("This is an image writting 'first meme'. Is this image hateful? Answer yes or "
                                       "no. Answer:") and hm.split == "dev"
    ok = read("okvqa")
    assert ok.items[1].target == ["two"] * 10 and ok.items[0].image.endswith("COCO_val2014_000000000042.jpg")

    refcoco = BENCHMARKS["refcoco"].read(tmp_path / "refer")
    assert [it.id for it in refcoco.items] == ["val/0/100", "val/0/101", "testA/1/102", "testB/2/103"]
    assert refcoco.items[0].instruction == "[refer] give me the location of left dog"
    assert refcoco.items[2].target == {"bbox": [50.0, 50.0, 50.0, 50.0], "width": 100, "height": 100}
    testb = BENCHMARKS["refcoco+"].read(tmp_path / "refer", split="testB")
    assert [it.id for it in testb.items] == ["testB/2/103"]  # each split from its own refs
    refg = BENCHMARKS["refcocog"].read(tmp_path / "refer")
    assert [it.group for it in refg.items] == ["val", "test"]
    with pytest.raises(ValueError, match="testA"):
        BENCHMARKS["refcocog"].read(tmp_path / "refer", split="testA")

    scoring_only = BENCHMARKS["gqa"].read(tmp_path / "gqa", need_images=False)
    assert scoring_only.items[0].image == ""
    (tmp_path / "gqa" / "images" / "n2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="n2.jpg"):
        read("gqa")
    with pytest.raises(ValueError, match="--data is required"):
        BENCHMARKS["gqa"].read(None)


def test_prompts_are_the_papers():
    assert PROMPTS["vsr"] == "[vqa] Based on the image, is this statement true or false? {caption}"
    assert PROMPTS["refcoco"] == "[refer] give me the location of {sentence}"
    assert PROMPTS["vizwiz"] == ("[vqa] The question is '{question}' Based on the image, answer the question with a "
                                 "single word or phrase. and reply 'unanswerable' when the provided information is "
                                 "insufficient")


def test_default_template():
    model = tiny_model()
    assert default_template(model) == "eval"  # an official-style template (stage3) -> the benchmark template
    assert template_for(BENCHMARKS["iconqa"], "eval") == "stage3" and template_for(BENCHMARKS["gqa"], "eval") == "eval"
    model.config.prompt.template = "chatml"
    assert default_template(model) == "chatml" and template_for(BENCHMARKS["iconqa"], "chatml") == "chatml"


# --- the scoring passes ---------------------------------------------------------------------------------------------

def test_candidate_losses_are_the_official_per_sample_loss():
    """Each row's loss equals the training forward's loss (HF mean over the answer tokens) for that sample alone,
    whatever else shares the batch."""
    model = tiny_model()
    embeds = torch.randn(3, 4, model.config.llm.hidden_size)
    prompts = ["###Human: <Img><ImageHere></Img> q ###Assistant: ", "###Human: <Img><ImageHere></Img> longer q "
               "###Assistant: ", "###Human: <Img><ImageHere></Img> x ###Assistant: "]
    answers = ["circle", "4", "a much longer answer"]
    batched = candidate_losses(model, prompts, embeds, answers)
    with torch.no_grad():
        single = [model(None, [p], [a], image_embeds=e[None]).loss.item() for p, a, e in zip(prompts, answers, embeds)]
    assert batched == pytest.approx(single, rel=1e-4)


def test_yes_probability_does_not_depend_on_the_batch():
    model = tiny_model()
    embeds = torch.randn(2, 4, model.config.llm.hidden_size)
    prompts = ["###Human: <Img><ImageHere></Img> short###Assistant: ",
               "###Human: <Img><ImageHere></Img> a much longer question here###Assistant: "]
    together = yes_probability(model, prompts, embeds)
    alone = [yes_probability(model, [p], e[None])[0] for p, e in zip(prompts, embeds)]
    assert together == pytest.approx(alone, abs=1e-5) and all(0 < p < 1 for p in together)


def test_shared_prefix_generation_equals_plain_generation(monkeypatch):
    """Questions about the same image share the prompt up to the question; running that part once per image must
    give the answers model.generate gives."""
    model = tiny_model()
    bench = BENCHMARKS["easyvqa"]
    items = bench.read(None).items[8:20]  # questions about two or three images
    runner = Runner(model, bench, template="eval", batch_size=12, max_new_tokens=6)
    embeds = runner.images([it.image for it in items])
    prompts = [runner.prompt(it) for it in items]
    plain = model.generate(None, prompts, image_embeds=embeds, settings=runner.settings)
    shared = generate_shared_prefix(model, prompts, embeds, [it.image for it in items], runner.settings)
    assert len({it.image for it in items}) > 1 and shared == plain
    # prompts that differ before the image cannot share: the caller falls back to model.generate
    other = [prompts[0], prompts[1].replace("###Human", "###User")]
    assert generate_shared_prefix(model, other, embeds[:2], ["a", "b"], GenerationSettings(max_new_tokens=2)) is None
    # the runner uses the shared path and gives the same records as with it switched off
    fast = Runner(model, bench, template="eval", batch_size=12, max_new_tokens=6).predict(items)
    slow = Runner(model, bench, template="eval", batch_size=12, max_new_tokens=6, share_prefix=False).predict(items)
    assert fast == slow


# --- end to end ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("benchmark", ALL)
def test_every_benchmark_runs_end_to_end(benchmark, tmp_path, capsys):
    data = data_for(benchmark, tmp_path)
    out = tmp_path / "out"
    argv = ["eval", "--benchmark", benchmark, "--model", "tiny", "--out", str(out), "--batch-size", "3",
            "--max-new-tokens", "4", "--no-progress", "--json"]
    argv += ["--data", data] if data else ["--limit", "5"]
    assert cli(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    preds = load_predictions(out / f"{benchmark}.predictions.jsonl")
    assert summary["n"] == summary["items"] == len(preds) > 0
    assert set(preds[0]) >= {"id", "prompt", "raw", "answer", "score"}
    assert preds[0]["prompt"].startswith("###Human: <Img><ImageHere></Img> ")
    assert summary["config_sha256"] == config_sha256(tiny_model())
    assert summary["decoding"]["mode"] in ("generate", "rank", "yesno")
    assert summary["versions"]["tinygptv"] and all(len(h) == 64 for h in summary["files"].values())
    assert json.loads((out / f"{benchmark}.summary.json").read_text())["scores"] == summary["scores"]
    if benchmark == "hm":
        assert all(0 <= p["p_yes"] <= 1 for p in preds) and "auroc" in summary["scores"]["strict"]
    if benchmark == "iconqa":
        assert preds[0]["prompt"].endswith(" ###Assistant: ") and len(preds[0]["losses"]) == 3
        assert summary["decoding"]["answer_suffix"] == "\n"  # the official benchmark config's end_sym
        assert preds[0]["answer"] in ("3", "4", "5")

    # `eval score` on the written predictions gives the same numbers, without a model
    score_argv = ["eval", "score", "--benchmark", benchmark, "--predictions",
                  str(out / f"{benchmark}.predictions.jsonl"), "--json"]
    score_argv += ["--data", data] if data else ["--limit", "5"]
    assert cli(score_argv) == 0
    assert json.loads(capsys.readouterr().out)["scores"] == summary["scores"]


def _counting_predictions(monkeypatch) -> list[int]:
    """Count the items the runner sends to the model (through either generation path)."""
    calls: list[int] = []
    original = Runner.predict

    def counted(self, batch):
        calls.append(len(batch))
        return original(self, batch)

    monkeypatch.setattr(Runner, "predict", counted)
    return calls


def test_resume_skips_what_is_done(tmp_path, monkeypatch):
    data, out = fx.gqa(tmp_path / "data"), tmp_path / "out"
    calls = _counting_predictions(monkeypatch)
    model = tiny_model()
    kw = dict(model_name="tiny", batch_size=2, max_new_tokens=3, progress=False)
    first = run_eval(model, "gqa", data, out, limit=3, **kw)
    assert first["n"] == 3 and sum(calls) == 3
    lines = (out / "gqa.predictions.jsonl").read_text().splitlines()

    calls.clear()
    full = run_eval(model, "gqa", data, out, **kw)
    assert sum(calls) == 1 and full["n"] == 4 and full["resumed_from"] == 3 and full["generated"] == 1
    assert (out / "gqa.predictions.jsonl").read_text().splitlines()[:3] == lines

    calls.clear()
    again = run_eval(model, "gqa", data, out, **kw)  # nothing left to do
    assert calls == [] and again["scores"] == full["scores"]


def test_resume_cuts_a_half_written_line_and_refuses_other_settings(tmp_path, monkeypatch):
    data, out = fx.gqa(tmp_path / "data"), tmp_path / "out"
    model = tiny_model()
    kw = dict(model_name="tiny", batch_size=4, max_new_tokens=3, progress=False)
    run_eval(model, "gqa", data, out, limit=2, **kw)
    path = out / "gqa.predictions.jsonl"
    with open(path, "a") as f:
        f.write('{"id": "g3", "prompt": "###Hu')  # killed mid-write
    with pytest.raises(ValueError, match="incomplete"):
        load_predictions(path)
    calls = _counting_predictions(monkeypatch)
    summary = run_eval(model, "gqa", data, out, **kw)
    assert sum(calls) == 2 and summary["n"] == 4 and len(load_predictions(path)) == 4

    with pytest.raises(ValueError, match="other settings"):
        run_eval(model, "gqa", data, out, template="stage3", **kw)
    fresh = run_eval(model, "gqa", data, out, template="stage3", overwrite=True, **kw)
    assert fresh["resumed_from"] == 0 and fresh["template"] == "stage3"


@pytest.mark.parametrize("benchmark", [*ALL, "scenes"])
def test_every_benchmark_runs_with_the_bundled_nano_model(benchmark, nano, tmp_path):
    """The default model through every benchmark's files: its own template, real answers, both scores."""
    data = None if benchmark in ("easyvqa", "scenes") else fx.WRITERS[benchmark](tmp_path / "data")
    summary = run_eval(nano, benchmark, data, tmp_path / "out", model_name="tinygptv-nano", limit=2, batch_size=2,
                       max_new_tokens=6, progress=False)
    preds = load_predictions(tmp_path / "out" / f"{benchmark}.predictions.jsonl")
    assert summary["n"] == len(preds) == 2
    assert preds[0]["prompt"].startswith("<|im_start|>user\n<Img><ImageHere></Img> ")
    assert set(summary["scores"]) >= {"strict", "tinygptv-compatible"}


def test_easyvqa_scores_each_kind_of_answer():
    """The breakdown the README quotes comes from the summary itself: one yes/no, one colour and one shape question,
    the colour one answered wrong."""
    bench = BENCHMARKS["easyvqa"]
    items = bench.read(None, need_images=False).items
    chosen = [next(it for it in items if it.group == kind) for kind in ("yes/no", "colour", "shape")]
    preds = [{"id": it.id, "answer": it.target} for it in chosen]
    preds[1]["answer"] = "purple" if chosen[1].target != "purple" else "teal"
    scores = [bench.score_item(it, p) for it, p in zip(chosen, preds)]
    summary = bench.summarize(chosen, preds, scores)["strict"]
    assert (summary["yes/no"], summary["colour"], summary["shape"]) == (100.0, 0.0, 100.0)
    assert abs(summary["accuracy"] - 200 / 3) < 1e-9


def test_okvqa_compatible_is_the_copy_tinygptv_imports_not_the_master():
    """Hand-worked: MiniGPT-4's VQAEval copy normalises neither side when the ten answers agree and both otherwise,
    comparing without case; the public master normalises the prediction always and the answers by punctuation only."""
    assert tinygptv_vqa_accuracy("Yes.", ["yes"] * 10) == 0.0 and official_vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    mixed = ["10"] * 3 + ["ten"] * 3 + ["9"] * 4
    assert tinygptv_vqa_accuracy("ten", mixed) == 1.0 and abs(official_vqa_accuracy("ten", mixed) - 0.9) < 1e-12
    assert tinygptv_vqa_accuracy("YES", ["yes"] * 10) == 1.0  # case never matters
    item = Item(id="1", image="", instruction="", target=["yes"] * 10)
    assert BENCHMARKS["okvqa"].score_item(item, {"id": "1", "answer": "Yes."}).compatible == 0.0


def test_gqa_compatible_tests_the_text_as_generated():
    bench = BENCHMARKS["gqa"]
    item = Item(id="1", image="", instruction="", target="yes")
    assert bench.score_item(item, {"id": "1", "raw": "ye<unk>s", "answer": "yes"}).compatible == 0.0
    assert bench.score_item(item, {"id": "1", "raw": "Yes, it is.", "answer": "yes"}).compatible == 1.0
