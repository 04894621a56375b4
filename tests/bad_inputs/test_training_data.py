# Bad training data on the way into batches: malformed records (a missing or mistyped field), annotation files that
# are not JSON or nest too deeply, images that are missing, broken or bombs, incomplete shard samples. With
# on_bad_record stop the first one ends the run before or when it is met, naming dataset, file, record and field (or
# image); with skip every kind is left out and counted per reason.
from __future__ import annotations

import json
import shutil

import pytest

from bad_inputs.commands import ROOT
from bad_inputs.hostile import bomb_png
from dataset_fixtures import caption_member, jpeg_bytes, write_tar
from tinygptv.config import preset
from tinygptv.data.datasets import DATASETS, CaptionShards, DatasetError, build_dataset
from tinygptv.data.image_processor import ImageProcessor
from tinygptv.data.templates import IMAGE_PROMPT, TEMPLATES
from tinygptv.train.batches import MixedBatches, PromptRenderer


def broken_copy(folder, malformed: bool = True):
    """The bundled tiny data set with one record of each kind of problem: 1 has no 'conversations' and 3 has a number
    for text (if `malformed`), 4's image is missing, 5's is a bomb, 6's is not an image. 0, 2 and 7 are fine."""
    data = folder / "data"
    shutil.copytree(ROOT / "examples" / "tiny-data", data)
    records = json.loads((data / "train.json").read_text())
    if malformed:
        del records[1]["conversations"]
        records[3]["conversations"][1]["value"] = 42
    (data / records[4]["image"]).unlink()
    bomb_png(data / records[5]["image"], 30000, 30000)
    (data / records[6]["image"]).write_text("not pixels")
    (data / "train.json").write_text(json.dumps(records))
    return data / "train.json"


@pytest.fixture
def broken_data(tmp_path):
    return broken_copy(tmp_path)


def stream(datasets: dict, skip: bool, batch_size: int = 2) -> MixedBatches:
    renderer = PromptRenderer(TEMPLATES["stage3"], "###", IMAGE_PROMPT, "<|endoftext|>")
    return MixedBatches(datasets, {name: 1.0 for name in datasets}, {name: batch_size for name in datasets},
                        ImageProcessor(preset("tiny").vision), renderer, seed=0, skip_bad=skip)


def test_a_malformed_record_stops_before_training_naming_file_record_and_field(broken_data):
    reader = DATASETS["llava_json"](ann_path=broken_data)  # readers set malformed records aside ...
    assert [str(e) for e in reader.bad_records] == [
        "train.json:1: missing field 'conversations'",
        "train.json:3: conversations[1]: field 'value': expected string, got integer"]
    with pytest.raises(DatasetError, match=r"^dataset 'mine': train\.json:1: missing field 'conversations' \(1 more "
                                           r"malformed records\); fix the file, or set on_bad_record: skip"):
        stream({"mine": reader}, skip=False)  # ... and the batch stream stops at once with on_bad_record: stop
    with pytest.raises(DatasetError, match=r"train\.json:1: missing field 'conversations'"):
        build_dataset("llava_json", ann_path=broken_data)  # so does build_dataset, by default


def test_bad_images_stop_the_run_naming_dataset_json_record_and_image(tmp_path):
    reader = build_dataset("llava_json", ann_path=broken_copy(tmp_path, malformed=False))
    batches = stream({"mine": reader}, skip=False, batch_size=1)
    seen = []
    for _ in range(len(reader)):
        try:
            batches.next_batch()
        except DatasetError as e:
            seen.append(str(e))
    assert any(m.startswith("dataset 'mine': train.json:4: image ") and m.endswith("not found") for m in seen)
    assert any(m.startswith("dataset 'mine', record train.json:5: ") and "green_square.png: the image has more "
               "than 179 megapixels" in m for m in seen)
    assert any(m.startswith("dataset 'mine', record train.json:6: ") and "not an image in a supported format" in m
               for m in seen)


def test_skip_leaves_every_kind_out_and_counts_it_per_reason(broken_data):
    batches = stream({"mine": build_dataset("llava_json", ann_path=broken_data, on_bad_record="skip")}, skip=True)
    samples = [s for _ in range(6) for s in batches.next_batch().sources]  # two passes over the 6 parsed records
    assert set(samples) == {"train.json:0", "train.json:2", "train.json:7"}
    counts = batches.state.skipped["mine"]
    assert counts["malformed record"] == 2  # set aside once, when the file was read
    assert counts["missing image"] >= 1 and counts["image too large"] >= 1 and counts["unreadable image"] >= 1
    assert batches.state_dict()["skipped"] == {"mine": counts}


def test_annotation_files_that_are_not_json_name_the_file(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetError, match=r"deep\.json: not valid JSON \(RecursionError"):
        build_dataset("llava_json", ann_path=deep)
    cut = tmp_path / "cut.json"
    cut.write_text('[{"image": "a.png", "conversations": [')
    with pytest.raises(DatasetError, match=r"cut\.json: not valid JSON"):
        build_dataset("llava_json", ann_path=cut)


def test_bad_shard_samples_stop_or_are_skipped_and_counted(tmp_path):
    shard = write_tar(tmp_path / "bad.tar", caption_member("k0", "fine") + caption_member("k1", "fine too")
                      + [("k2.jpg", jpeg_bytes()), ("k2.json", b"{not json")]
                      + [("k3.jpg", b"not a jpeg"), ("k3.json", json.dumps({"caption": "x"}).encode())]
                      + caption_member("k4", "last"))
    with pytest.raises(DatasetError, match=r"^dataset 'laion': bad\.tar:k2\.json: not valid JSON"):
        stream({"laion": CaptionShards(shard, shuffle=False)}, skip=False, batch_size=3).next_batch()
    skipping = stream({"laion": CaptionShards(shard, shuffle=False)}, skip=True, batch_size=3)
    assert skipping.next_batch().sources == ["bad.tar:k0", "bad.tar:k1", "bad.tar:k4"]
    assert skipping.state.skipped["laion"] == {"malformed record": 1, "unreadable image": 1}
