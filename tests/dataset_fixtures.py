# Writers for tiny dataset files in each publisher's real layout (JSON, REFER pickles, webdataset tars, images),
# used by test_datasets.py to exercise every reader on files it would meet in training.
from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path
from typing import Any

from PIL import Image


def write_image(path: Path, size: tuple[int, int] = (8, 6)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path, format="JPEG")
    return str(path)


def write_json(path: Path, data: Any) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def jpeg_bytes(size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    """A webdataset shard: members written in the given order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def caption_member(key: str, caption: str) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", jpeg_bytes()), (f"{key}.json", json.dumps({"caption": caption}).encode()),
            (f"{key}.txt", caption.encode())]


def write_refer(root: Path, dataset: str, split_by: str, refs: list[dict], images: list[dict],
                annotations: list[dict]) -> None:
    """REFER layout: {root}/{dataset}/refs({split_by}).p (plain pickle) + instances.json."""
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)  # the original files are Python-2 pickles
    write_json(folder / "instances.json", {"images": images, "annotations": annotations, "categories": []})


def ref(ref_id: int, ann_id: int, image_id: int, split: str, *raws: str) -> dict:
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
            "sentences": [{"raw": r, "sent": r.lower(), "sent_id": ref_id * 10 + k, "tokens": r.split()}
                          for k, r in enumerate(raws)]}
