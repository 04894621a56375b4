# What every dataset reader produces: one training example as text turns plus an image reference.
# Data path: dataset files -> reader -> [Sample] -> batch builder (adds <Img><ImageHere></Img>, chat template,
# end symbol) -> model.
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from PIL import Image

from tinygptv.data.image_file import EncodedImage

ImageRef = Union[str, EncodedImage, Image.Image, None]


class DatasetError(ValueError):
    """Bad or unusable training data. The message always names the file and, where there is one, the record (index
    or id) and the field, so a broken record in a million-line annotation file can be found and fixed. `reason` is a
    short category, for the counts of records that `on_bad_record: skip` leaves out."""

    def __init__(self, message: str, reason: str = "malformed record"):
        super().__init__(message)
        self.reason = reason


@dataclass
class Sample:
    """One example, before any tokenisation.

    image:  path of the image file (readers check it exists but never open it: decoding is the batch builder's job);
            an `EncodedImage` (bytes and a name) for webdataset shards, whose images live inside a tar and have no
            path of their own; or a `PIL.Image.Image` already in memory (samples a caller builds itself);
            None for text-only samples (unnatural instructions).
    turns:  (instruction, answer) pairs. The first turn is the one that sees the image. Instruction None means
            caption-only pretraining (stages 1-2: the model sees just [image] caption). Instructions carry task tags
            ("[vqa] ...") but not the "<Img><ImageHere></Img> " prefix, the trailing space the official code appends,
            the chat template or the end symbol: the batch builder adds those.
    task:   "vqa", "caption", "refer", "identify", "grounding", "detection" or None (no tag).
    source: "file:record" (e.g. "vqa_train.json:17"), for error messages and debugging.
    """

    image: ImageRef
    turns: list[tuple[str | None, str]] = field(default_factory=list)
    task: str | None = None
    source: str = ""
