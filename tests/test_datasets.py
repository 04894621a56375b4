# Tests of the dataset readers (tinygptv/data/datasets): for each format, tiny files in the publisher's real layout
# go in, and the exact (instruction, answer, image) triples that reach the batch builder come out.
from __future__ import annotations

import collections
import itertools
import json
import os
import pickle

import pytest

from dataset_fixtures import caption_member, ref, write_image, write_json, write_refer, write_tar
from tinygptv.data.datasets import DATASETS, CaptionShards, DatasetError, Sample, build_dataset
from tinygptv.data.datasets.safe_pickle import load_plain_pickle
from tinygptv.data.datasets.text import (ALIGNMENT_PROMPTS, CAPTION_POOL, CAPTION_PROMPTS, DETECTION_POOL,
                                         GROUNDING_POOL, IDENTIFY_POOL, REFER_POOL, VQA_POOL, blip_caption)
from tinygptv.data.boxes import box_text
from tinygptv.data.datasets.vqa import weighted_answer
from tinygptv.data.datasets.webdataset import expand_braces
from tinygptv.data.image_file import open_image


def only_turn(sample: Sample) -> tuple[str | None, str]:
    assert len(sample.turns) == 1
    return sample.turns[0]


def filled(pool, value) -> set[str]:
    return {template.format(value) for template in pool}


# ---------------------------------------------------------------- text helpers and pools


def test_blip_caption_matches_the_official_processor():
    assert blip_caption('A Man (tall) rides: "Horse"!  Fast; ok~ #1 *.') == "a man tall rides horse fast ok 1"
    assert blip_caption("  Hello,\n\nWorld?  ") == "hello, world?"  # commas and ? survive; a run of whitespace collapses
    assert blip_caption("a\tb") == "a\tb"  # a single tab is not a run: the official regex keeps it
    assert blip_caption(" ".join(f"w{i}" for i in range(60))) == " ".join(f"w{i}" for i in range(50))
    assert blip_caption("Abc", max_words=1) == "abc"


def test_box_text_is_truncated_on_the_0_100_grid():
    # COCO bbox [x=33, y=20, w=100, h=41] on a 640x480 image: 33/640*100 = 5.156, 133/640*100 = 20.78, 61/480*100 = 12.7
    assert box_text(33, 20, 133, 61, 640, 480) == "{<5><4><20><12>}"
    assert box_text(0, 0, 640, 480, 640, 480) == "{<0><0><100><100>}"
    with pytest.raises(ValueError):
        box_text(0, 0, 1, 1, 0, 10)


def test_pools_are_complete():
    assert len(CAPTION_PROMPTS) == 17 and CAPTION_PROMPTS[6] == "A photo of "
    assert all(p.startswith("[caption] ") for p in CAPTION_POOL)
    assert len(VQA_POOL) == 2 and len(REFER_POOL) == 7 and len(IDENTIFY_POOL) == 7 and len(GROUNDING_POOL) == 4
    assert DETECTION_POOL == ("[detection] {}",) and len(ALIGNMENT_PROMPTS) == 4


def test_registry_has_every_official_name():
    official = {"laion", "cc_sbu", "cc_sbu_align", "multitask_conversation", "llava_conversation", "llava_detail",
                "llava_reason", "unnatural_instruction", "refvg", "flickr_grounded_caption", "flickr_CaptionToPhrase",
                "flickr_ObjectToPhrase", "textcaps_caption", "refcoco", "refcoco+", "refcocop", "refcocog",
                "invrefcoco", "invrefcoco+", "invrefcocop", "invrefcocog", "coco_vqa", "ok_vqa", "aok_vqa", "gqa",
                "coco_caption", "ocrvqa", "llava_json"}
    assert official <= set(DATASETS.names())
    with pytest.raises(KeyError, match="coco_vqa"):
        DATASETS["coco-vqa"]


# ---------------------------------------------------------------- stage 1-2: webdataset shards


@pytest.fixture
def shards(tmp_path):
    write_tar(tmp_path / "00000.tar", caption_member("a/0", "A Dog. Running!") + caption_member("a/1", "Two cats"))
    write_tar(tmp_path / "00001.tar", caption_member("b/0", "The SKY") + caption_member("b/1", "one (red) car"))
    return str(tmp_path / "{00000..00001}.tar")


def test_brace_expansion():
    assert expand_braces("/d/{00008..00011}.tar") == [f"/d/{n:05d}.tar" for n in range(8, 12)]
    assert expand_braces("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_laion_shards_give_processed_captions_and_named_image_bytes(shards):
    ds = build_dataset("laion", shards=shards, shuffle=False)
    samples = list(ds)
    assert [s.source for s in samples] == ["00000.tar:a/0", "00000.tar:a/1", "00001.tar:b/0", "00001.tar:b/1"]
    assert [only_turn(s) for s in samples] == [(None, "a dog running"), (None, "two cats"), (None, "the sky"),
                                               (None, "one red car")]
    assert [s.image.name for s in samples] == [f"{s.source}.jpg" for s in samples]
    assert all(open_image(s.image).size == (8, 6) and s.task is None for s in samples)


def test_shard_shuffling_is_seeded(shards):
    def order(seed, epoch):
        ds = build_dataset("cc_sbu", shards=[shards], seed=seed, buffer_size=3)
        ds.set_epoch(epoch)
        return [s.source for s in ds]

    assert sorted(order(0, 0)) == ["00000.tar:a/0", "00000.tar:a/1", "00001.tar:b/0", "00001.tar:b/1"]
    assert order(0, 0) == order(0, 0)
    assert len({tuple(order(seed, epoch)) for seed in range(4) for epoch in range(4)}) > 1
    resampled = list(itertools.islice(iter(build_dataset("laion", shards=shards, resample=True)), 20))
    assert len(resampled) == 20 and {s.source.split(":")[0] for s in resampled} <= {"00000.tar", "00001.tar"}


def test_ranks_read_disjoint_shards(shards):
    seen = [{s.source for s in CaptionShards(shards, seed=4, rank=r, world_size=2)} for r in range(2)]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 4
    assert all(len({source.split(":")[0] for source in part}) == 1 for part in seen)  # one whole shard each


def test_incomplete_shard_sample_is_an_error_or_skipped(tmp_path):
    bad = write_tar(tmp_path / "bad.tar", caption_member("k0", "fine")
                    + [("k1.jpg", caption_member("x", "")[0][1]), ("k2.json", json.dumps({"text": "x"}).encode())])
    with pytest.raises(DatasetError, match=r"bad\.tar:k1: no \.json member"):
        list(CaptionShards(bad, shuffle=False))
    lenient = CaptionShards(bad, shuffle=False, strict=False)
    assert [s.source for s in lenient] == ["bad.tar:k0"] and lenient.skipped == 2
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        CaptionShards(str(tmp_path / "missing.tar"))


# ---------------------------------------------------------------- stage 3: cc_sbu_align


def test_cc_sbu_align_keeps_the_raw_caption(tmp_path):
    write_json(tmp_path / "filter_cap.json", {"annotations": [
        {"image_id": "2", "caption": "The image shows a Red car. It is parked (near a tree)."},
        {"image_id": "7", "caption": "A cat."}]})
    write_image(tmp_path / "image" / "2.jpg")
    ds = build_dataset("cc_sbu_align", root=str(tmp_path), seed=1)
    sample = ds[0]
    instruction, answer = only_turn(sample)
    assert instruction in ALIGNMENT_PROMPTS and sample.task is None
    assert answer == "The image shows a Red car. It is parked (near a tree)."  # no blip_caption here
    assert sample.image == str(tmp_path / "image" / "2.jpg") and sample.source == "filter_cap.json:0"
    with pytest.raises(DatasetError, match=r"filter_cap\.json:1: image .*7\.jpg not found"):
        ds[1]


# ---------------------------------------------------------------- stage 4: conversations


def llava_record(image_id, *texts):
    roles = itertools.cycle(["human", "gpt"])
    return {"id": image_id, "conversations": [{"from": next(roles), "value": t} for t in texts]}


def test_llava_conversation_keeps_every_turn(tmp_path):
    path = write_json(tmp_path / "conversation_58k.json", [
        llava_record("000000215677", "<image>\nWhat is the Man\ndoing?", "He is surfing.", "Is it safe?",
                     "Mostly, yes.", "dangling question")])
    for name in ("llava_conversation", "multitask_conversation"):
        sample = build_dataset(name, ann_path=path, image_root=str(tmp_path), check_images=False)[0]
        assert sample.turns == [("What is the Mandoing?", "He is surfing."), ("Is it safe?", "Mostly, yes.")]
        assert sample.image == os.path.join(str(tmp_path), "COCO_train2014_000000215677.jpg") and sample.task is None


def test_llava_detail_processes_only_the_question(tmp_path):
    path = write_json(tmp_path / "detail_23k.json", [
        llava_record("000000000009", "Describe the image. <image>", "A Plate: rice, broccoli.", "more?", "no.")])
    for name in ("llava_detail", "llava_reason"):
        sample = build_dataset(name, ann_path=path, image_root=str(tmp_path), check_images=False)[0]
        assert sample.turns == [("describe the image", "A Plate: rice, broccoli.")]


def test_llava_json_fine_tuning_format(tmp_path):
    write_image(tmp_path / "imgs" / "cat.jpg")
    path = write_json(tmp_path / "mine.json", [
        {"image": "imgs/cat.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?\nBe brief."}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]},
        {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]}])
    ds = build_dataset("llava_json", ann_path=path)
    assert ds[0].image == str(tmp_path / "imgs" / "cat.jpg")
    assert ds[0].turns == [("What is this?\nBe brief.", "A cat."), ("Colour?", "Red.")]
    assert ds[1].image is None and ds[1].turns == [("Say hi.", "Hi!")]

    bad = write_json(tmp_path / "bad.json", [
        {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}])
    with pytest.raises(DatasetError, match=r"bad\.json:0: field 'conversations\[0\]\.from' is 'gpt'"):
        build_dataset("llava_json", ann_path=bad)


def test_unnatural_instruction_is_text_only_and_processed(tmp_path):
    path = write_json(tmp_path / "filtered_unnatural_instruction.json", [
        {"instances": [{"instruction_with_input": "Sort: B, A.", "constraints": "Answer (in order).",
                        "output": "A, B!"}]},
        {"instances": [{"instruction_with_input": "Say \"HI\"", "constraints": None, "output": "HI"}]}])
    ds = build_dataset("unnatural_instruction", ann_path=path)
    assert ds[0].image is None and ds[0].task is None
    assert ds[0].turns == [("sort b, a answer in order", "a, b")]
    assert ds[1].turns == [("say hi", "hi")]


# ---------------------------------------------------------------- stage 4: VQA


def test_weighted_answer_picks_listed_answers_by_frequency():
    import random

    picks = collections.Counter(weighted_answer(["yes", "yes", "yes", "no"], random.Random(s)) for s in range(2000))
    assert set(picks) == {"yes", "no"} and 0.68 < picks["yes"] / 2000 < 0.82


def test_coco_vqa_drops_missing_images_and_samples_by_frequency(tmp_path):
    root = tmp_path / "train2014"
    write_image(root / "COCO_train2014_000000000001.jpg")
    write_image(root / "COCO_val2014_000000000002.jpg")
    train = write_json(tmp_path / "vqa_train.json", [
        {"question_id": 1, "question": "What Color is the Cat?", "image": "train2014/COCO_train2014_000000000001.jpg",
         "answer": ["Black.", "black.", "Black.", "grey"]},
        {"question_id": 3, "question": "Gone?", "image": "train2014/COCO_train2014_000000000003.jpg",
         "answer": ["x"]}])
    val = write_json(tmp_path / "vqa_val.json", [
        {"question_id": 2, "question": "How many?", "image": "val2014/COCO_val2014_000000000002.jpg",
         "answer": ["2"]}])
    for name in ("coco_vqa", "ok_vqa"):
        ds = build_dataset(name, ann_path=[train, val], image_root=str(root), seed=5)
        assert len(ds) == 2 and ds.missing_images == 1
        first = ds[0]
        instruction, answer = only_turn(first)
        assert instruction in filled(VQA_POOL, "what color is the cat?") and first.task == "vqa"
        assert answer in {"black", "grey"} and first.source == "vqa_train.json:0"
        assert first.image == str(root / "COCO_train2014_000000000001.jpg")
        assert ds[1].source == "vqa_val.json:0" and only_turn(ds[1])[1] == "2"
    answers = set()
    for seed in range(40):
        ds = build_dataset("coco_vqa", ann_path=[train, val], image_root=str(root), seed=seed)
        assert ds[0] == ds[0]  # deterministic per (seed, index, epoch)
        answers.add(only_turn(ds[0])[1])
    assert answers == {"black", "grey"}  # "Black." and "black." are separate answers that both process to "black"


def test_coco_vqa_with_every_image_missing_is_an_error(tmp_path):
    path = write_json(tmp_path / "vqa_train.json", [{"question": "q", "image": "a.jpg", "answer": ["x"]}])
    with pytest.raises(DatasetError, match=r"vqa_train\.json: no usable records \(1 dropped"):
        build_dataset("coco_vqa", ann_path=path, image_root=str(tmp_path))


def test_aok_vqa_uses_direct_answers(tmp_path):
    write_image(tmp_path / "000000299207.jpg")
    path = write_json(tmp_path / "aokvqa_v1p0_train.json", [
        {"question_id": "22Mex", "question": "What is the man by the bags awaiting?", "image": "train2017/000000299207.jpg",
         "choices": ["skateboarder", "train", "delivery", "cab"], "correct_choice_idx": 3,
         "direct_answers": ["ride", "ride", "bus", "taxi", "travelling", "traffic", "taxi", "cab", "cab", "his ride"]}])
    sample = build_dataset("aok_vqa", ann_path=path, image_root=str(tmp_path))[0]
    instruction, answer = only_turn(sample)
    assert instruction in filled(VQA_POOL, "what is the man by the bags awaiting?")
    assert answer in {"ride", "bus", "taxi", "travelling", "traffic", "cab", "his ride"}


def test_gqa(tmp_path):
    path = write_json(tmp_path / "train_balanced_questions.json", [
        {"image": "2354786.jpg", "question": "Is the sky dark?", "answer": "Yes", "question_id": "02930152"}])
    sample = build_dataset("gqa", ann_path=path, image_root=str(tmp_path), check_images=False)[0]
    assert sample.image == os.path.join(str(tmp_path), "2354786.jpg")
    assert only_turn(sample)[0] in filled(VQA_POOL, "is the sky dark?") and only_turn(sample)[1] == "yes"


def test_ocrvqa_keeps_split_1_and_takes_the_url_extension(tmp_path):
    path = write_json(tmp_path / "dataset.json", {
        "111": {"imageURL": "http://x/images/I/51.jpg", "questions": ["Who wrote this book?", "Is this a novel?"],
                "answers": ["J. Smith", "No"], "title": "t", "genre": "g", "split": 1},
        "222": {"imageURL": "http://x/images/I/52.gif", "questions": ["Q?"], "answers": ["A"], "split": 2}})
    ds = build_dataset("ocrvqa", ann_path=path, image_root=str(tmp_path), check_images=False)
    assert len(ds) == 2 and [s.source for s in (ds[0], ds[1])] == ["dataset.json:111[0]", "dataset.json:111[1]"]
    assert ds[0].image == os.path.join(str(tmp_path), "111.jpg")
    assert only_turn(ds[0])[0] in filled(VQA_POOL, "who wrote this book?") and only_turn(ds[0])[1] == "j smith"
    val = build_dataset("ocrvqa", ann_path=path, image_root=str(tmp_path), split=2, check_images=False)
    assert len(val) == 1 and val[0].image.endswith("222.gif")
    bad = write_json(tmp_path / "bad.json", {"9": {"imageURL": "u.jpg", "questions": ["a", "b"], "answers": ["c"],
                                                   "split": 1}})
    with pytest.raises(DatasetError, match=r"bad\.json:9: fields 'questions' and 'answers' differ"):
        build_dataset("ocrvqa", ann_path=bad, image_root=str(tmp_path))


# ---------------------------------------------------------------- stage 4: captions


def test_textcaps_caption(tmp_path):
    write_image(tmp_path / "011e7e629fb9ae7b.jpg")
    path = write_json(tmp_path / "TextCaps_0.1_train.json", {"dataset_type": "train", "data": [
        {"image_id": "011e7e629fb9ae7b", "caption_str": "A Sign that says: \"STOP\".", "image_path": "train/x.jpg"}]})
    sample = build_dataset("textcaps_caption", ann_path=path, image_root=str(tmp_path))[0]
    instruction, answer = only_turn(sample)
    assert instruction in CAPTION_POOL and sample.task == "caption"
    assert answer == "a sign that says stop" and sample.image == os.path.join(str(tmp_path), "011e7e629fb9ae7b.jpg")


def test_coco_caption_keeps_train_images_only(tmp_path):
    path = write_json(tmp_path / "coco_karpathy_train.json", [
        {"image": "val2014/COCO_val2014_000000000042.jpg", "caption": "val one", "image_id": "coco_42"},
        {"image": "train2014/COCO_train2014_000000000009.jpg", "caption": "A Plate of food.", "image_id": "coco_9"}])
    ds = build_dataset("coco_caption", ann_path=path, image_root=str(tmp_path), check_images=False)
    assert len(ds) == 1 and ds[0].source == "coco_karpathy_train.json:1"
    assert ds[0].image == os.path.join(str(tmp_path), "COCO_train2014_000000000009.jpg")
    assert only_turn(ds[0])[0] in CAPTION_POOL and only_turn(ds[0])[1] == "a plate of food"
    # the prompt is drawn per item and reproducibly: same seed, same prompt; over seeds, several prompts
    prompts = {only_turn(build_dataset("coco_caption", ann_path=path, image_root=str(tmp_path), seed=s,
                                       check_images=False)[0])[0] for s in range(30)}
    assert len(prompts) > 5


# ---------------------------------------------------------------- stage 4: RefCOCO family and Visual Genome


@pytest.fixture
def refer_root(tmp_path):
    images = [{"id": 42, "width": 640, "height": 480, "file_name": "COCO_train2014_000000000042.jpg"}]
    anns = [{"id": 7, "image_id": 42, "bbox": [33, 20, 100, 41], "category_id": 1},
            {"id": 8, "image_id": 42, "bbox": [0, 0, 64, 48], "category_id": 1}]
    refs = [ref(1, 7, 42, "train", "Man in RED shirt!", "left guy"), ref(2, 8, 42, "val", "the corner"),
            ref(3, 8, 42, "testA", "x")]
    for dataset, split_by in (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")):
        write_refer(tmp_path / "refer", dataset, split_by, refs, images, anns)
    write_image(tmp_path / "coco" / "COCO_train2014_000000000042.jpg")
    return tmp_path


def test_refcoco_refer_and_identify(refer_root):
    kwargs = dict(ann_path=str(refer_root / "refer"), image_root=str(refer_root / "coco"))
    box = "{<5><4><20><12>}"  # hand-computed in test_box_text_is_truncated_on_the_0_100_grid
    for name in ("refcoco", "refcoco+", "refcocop", "refcocog"):
        ds = build_dataset(name, **kwargs, seed=3)
        assert len(ds) == 1  # train only
        sample = ds[0]
        instruction, answer = only_turn(sample)
        assert answer == box and sample.task == "refer"
        assert instruction in filled(REFER_POOL, "man in red shirt") | filled(REFER_POOL, "left guy")
        assert sample.image == str(refer_root / "coco" / "COCO_train2014_000000000042.jpg")
        inverse = build_dataset("inv" + name, **kwargs, seed=3)[0]
        instruction, answer = only_turn(inverse)
        assert instruction in filled(IDENTIFY_POOL, box) and inverse.task == "identify"
        assert answer in {"man in red shirt", "left guy"}
    val = build_dataset("refcoco", **kwargs, split="val")
    assert len(val) == 1 and only_turn(val[0])[1] == "{<0><0><10><10>}"
    assert only_turn(build_dataset("invrefcocog", **kwargs, split="testA")[0])[1] == "x"
    assert len(build_dataset("refcoco", **kwargs, split=None)) == 3


def test_refcoco_bad_ann_id_names_the_record(tmp_path):
    write_refer(tmp_path, "refcoco", "unc", [ref(1, 99, 42, "train", "a")], [{"id": 42, "width": 4, "height": 4}], [])
    with pytest.raises(DatasetError, match=r"refs\(unc\)\.p:0: field 'ann_id' 99"):
        build_dataset("refcoco", ann_path=str(tmp_path), image_root=str(tmp_path))


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("obj", [collections.OrderedDict(a=1), [Payload()], [{"split": "train"}, set()]])
def test_restricted_unpickler_refuses_globals(tmp_path, obj):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    if isinstance(obj, list) and isinstance(obj[-1], set):  # sets are plain data: allowed
        assert load_plain_pickle(path) == obj
        return
    with pytest.raises(DatasetError, match=r"refs\(unc\)\.p: not loaded: refusing to load global"):
        load_plain_pickle(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="not a readable pickle"):
        load_plain_pickle(path)


def test_python2_byte_strings_load_as_text(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(b"\x80\x02]q\x00}q\x01U\x03rawq\x02U\x05caf\xc3\xa9q\x03sa.")  # py2: [{'raw': 'caf\xc3\xa9'}]
    assert load_plain_pickle(path) == [{"raw": "caf\u00e9"}]


def test_refvg_filters_small_regions_and_boxes_them(tmp_path):
    write_json(tmp_path / "image_data.json", [
        {"image_id": 1, "width": 800, "height": 600, "url": "https://cs.stanford.edu/VG_100K_2/1.jpg",
         "coco_id": None, "flickr_id": None}])
    write_json(tmp_path / "region_descriptions.json", [{"id": 1, "regions": [
        {"region_id": 10, "image_id": 1, "phrase": "A Shade of a TREE.", "x": 421, "y": 57, "width": 82, "height": 139},
        {"region_id": 11, "image_id": 1, "phrase": "the whole sky", "x": 0, "y": 0, "width": 800, "height": 300}]}])
    write_image(tmp_path / "VG_100K_2" / "1.jpg")
    ds = build_dataset("refvg", data_dir=str(tmp_path))
    assert len(ds) == 1  # 82*139 = 11398 < 16384 kept, 800*300 dropped
    sample = ds[0]
    instruction, answer = only_turn(sample)
    # 421/800*100 = 52.6, 57/600*100 = 9.5, 503/800*100 = 62.9, 196/600*100 = 32.7
    assert answer == "{<52><9><62><32>}" and instruction in filled(REFER_POOL, "a shade of a tree")
    assert sample.image == os.path.join(str(tmp_path), "VG_100K_2", "1.jpg")
    assert sample.source == "region_descriptions.json:0[0]" and sample.task == "refer"


# ---------------------------------------------------------------- stage 4: Flickr30k


def test_flickr_sets(tmp_path):
    write_image(tmp_path / "1000092795.jpg")
    grounded = write_json(tmp_path / "groundedcaption.json", [
        {"image_id": "1000092795", "grounded_caption": "<p>Two men</p> {<1><2><30><90>} Stand."}])
    sample = build_dataset("flickr_grounded_caption", ann_path=grounded, image_root=str(tmp_path))[0]
    assert only_turn(sample)[0] in GROUNDING_POOL and sample.task == "grounding"
    assert only_turn(sample)[1] == "<p>Two men</p> {<1><2><30><90>} Stand."  # no text processing
    assert sample.image == os.path.join(str(tmp_path), "1000092795.jpg")

    c2p = write_json(tmp_path / "captiontobbox.json", [
        {"image_id": 1000092795, "caption": "Two Men stand.", "output": "<p>Two Men</p> {<1><2><30><90>}"}])
    sample = build_dataset("flickr_CaptionToPhrase", ann_path=c2p, image_root=str(tmp_path))[0]
    assert sample.turns == [("[detection] Two Men stand.", "<p>Two Men</p> {<1><2><30><90>}")]
    assert sample.task == "detection"

    o2p = write_json(tmp_path / "phrasetobbox.json", [
        {"image_id": "1000092795", "phrase": "Two Men", "bbox": "{<1><2><30><90>}<delim>{<40><2><60><90>}"}])
    sample = build_dataset("flickr_ObjectToPhrase", ann_path=o2p, image_root=str(tmp_path))[0]
    assert sample.turns == [("[detection] Two Men", "<p>Two Men</p> {<1><2><30><90>}<delim>{<40><2><60><90>}")]


# ---------------------------------------------------------------- determinism and bad data


def test_choices_depend_on_seed_index_and_epoch_only(tmp_path):
    path = write_json(tmp_path / "groundedcaption.json",
                      [{"image_id": i, "grounded_caption": "c"} for i in range(40)])
    ds = build_dataset("flickr_grounded_caption", ann_path=path, image_root=str(tmp_path), seed=9, check_images=False)
    epoch0 = [ds[i].turns for i in range(40)]
    again = build_dataset("flickr_grounded_caption", ann_path=path, image_root=str(tmp_path), seed=9,
                          check_images=False)
    assert [again[i].turns for i in reversed(range(40))] == epoch0[::-1]  # order of access does not matter
    ds.set_epoch(1)
    assert [ds[i].turns for i in range(40)] != epoch0
    ds.set_epoch(0)
    assert [ds[i].turns for i in range(40)] == epoch0
    assert ds[-1] == ds[39]
    with pytest.raises(IndexError):
        ds[40]


def test_bad_records_name_file_record_and_field(tmp_path):
    def build(name, data, **kwargs):
        path = write_json(tmp_path / "ann.json", data)
        return build_dataset(name, ann_path=path, **kwargs)

    with pytest.raises(DatasetError, match=r"ann\.json:1: missing field 'question'"):
        build("gqa", [{"image": "a", "question": "q", "answer": "a"}, {"image": "b", "answer": "a"}],
              image_root=str(tmp_path))
    with pytest.raises(DatasetError, match=r"ann\.json:0: field 'answer': expected list, got string"):
        build("coco_vqa", [{"image": "a.jpg", "question": "q", "answer": "yes"}], image_root=str(tmp_path))
    with pytest.raises(DatasetError, match=r"ann\.json:0: field 'image_id': expected string or integer, got null"):
        build("flickr_ObjectToPhrase", [{"image_id": None, "phrase": "p", "bbox": "b"}], image_root=str(tmp_path))
    with pytest.raises(DatasetError, match=r"ann\.json:0: instances\[0\]: missing field 'output'"):
        build("unnatural_instruction", [{"instances": [{"instruction_with_input": "x", "constraints": None}]}])
    with pytest.raises(DatasetError, match=r"ann\.json: top level: expected list, got object"):
        build("gqa", {"data": []}, image_root=str(tmp_path))
    with pytest.raises(DatasetError, match=r"ann\.json: no usable records"):
        build("flickr_grounded_caption", [], image_root=str(tmp_path))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"broken\.json: not valid JSON"):
        build_dataset("gqa", ann_path=str(tmp_path / "broken.json"), image_root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"nowhere\.json: annotation file not found"):
        build_dataset("textcaps_caption", ann_path=str(tmp_path / "nowhere.json"), image_root=str(tmp_path))


def test_missing_image_is_reported_when_the_item_is_read(tmp_path):
    path = write_json(tmp_path / "phrasetobbox.json", [{"image_id": "404", "phrase": "p", "bbox": "{<0><0><1><1>}"}])
    ds = build_dataset("flickr_ObjectToPhrase", ann_path=path, image_root=str(tmp_path))  # building does not look
    with pytest.raises(DatasetError, match=r"phrasetobbox\.json:0: image .*404\.jpg not found"):
        ds[0]
