# Image opening and preprocessing, the step before the vision tower in the data path
# (file or bytes -> [open_image -> ImageProcessor] -> vision tower -> ln_vision -> Q-Former -> projector -> LLM).
# Every entry point (ask/chat, serve, the web demo, training, eval) opens images through open_image; the processor
# reproduces BLIP-2's eval transform as TinyGPT-V uses it: bicubic resize to a square (no crop), CLIP mean/std.
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import IO, NamedTuple, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from tinygptv.config import VisionConfig

# The largest image accepted, in pixels, checked from the header before anything is decoded. The model sees at most
# 448 x 448; 50 MP takes every camera and phone photo up to the 50 MP sensors, and decodes to at most 150 MB of
# RGB. Pillow's own guard only warns at 89 MP and refuses at 179 MP.
DEFAULT_MAX_PIXELS = 50_000_000
# A large JPEG is decoded at 1/2, 1/4 or 1/8 scale (Image.draft), as long as both sides stay at least this many times
# the model's input size: the bicubic resize that follows then still has twice the pixels it keeps.
DRAFT_MARGIN = 2
# The formats accepted. Pillow can open many more (EPS runs Ghostscript, some are rarely fuzzed); an input of the
# model is a photo or a screenshot. MPO is what many phone cameras write: a JPEG with a second frame.
FORMATS = ("PNG", "JPEG", "MPO", "GIF", "BMP", "WEBP", "TIFF", "PPM")


class ImageError(ValueError):
    """An image that cannot be used; the message is one line naming the image (file, request field or record) and
    the problem. `reason` is a short category for counts of skipped training records."""

    reason = "unreadable image"


class ImageTooLarge(ImageError):
    reason = "image too large"


class EncodedImage(NamedTuple):
    """An image file's bytes that have no path of their own (a tar member, an upload), with a name for messages."""

    name: str
    data: bytes


ImageInput = Union[str, Path, EncodedImage, Image.Image]


def open_image(source: str | Path | EncodedImage | bytes | IO[bytes], *, name: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int = 0) -> Image.Image:
    """Decode an image file into an 8-bit RGB image, the one way every entry point does it:
    - the pixel count is read from the header and refused above `max_pixels` before anything is decoded
      (ImageTooLarge), so a small file that declares 30000 x 30000 costs nothing;
    - a JPEG whose sides are both at least twice `draft_size` is decoded at a reduced scale;
    - the EXIF orientation is applied (a phone photo taken upright is seen upright);
    - 16-bit, CMYK, palette and other modes become RGB; transparent pixels are laid on white.
    Any failure is an ImageError (or FileNotFoundError for a missing file) naming the image: never a traceback from
    inside Pillow, whose decoders can raise many kinds of exception on a malformed file."""
    if isinstance(source, EncodedImage):
        name, source = name or source.name, io.BytesIO(source.data)
    elif isinstance(source, bytes):
        source = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        name = name or str(source)
        if not Path(source).is_file():
            raise FileNotFoundError(f"{source}: no such image file")
    name = name or "image"
    try:
        with warnings.catch_warnings():
            # between Pillow's warning (89 MP) and error (179 MP) it would decode: the limit below refuses first, and
            # with a larger max_pixels the warning is an error here rather than a line on stderr
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageTooLarge(f"{name}: the image is {width}x{height} = {width * height / 1e6:.1f} "
                                        f"megapixels, above the limit of {max_pixels / 1e6:g}")
                if draft_size > 0 and image.format in ("JPEG", "MPO"):
                    image.draft(None, (draft_size * DRAFT_MARGIN, draft_size * DRAFT_MARGIN))
                image.load()  # decodes now, so a truncated file fails here too
                return to_rgb(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(f"{name}: the image has more than {max_pixels / 1e6:g} megapixels, the limit") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image in a supported format ({', '.join(FORMATS)})") from None
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode the image") from None
    except Exception as e:  # a malformed file: OSError, SyntaxError, struct.error, ValueError, IndexError...
        raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {_one_line(e)})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of an opened image. 16-bit grey is scaled down rather than clipped (which would turn most of
    it white); transparency is composited on white, the background most screenshots and logos assume."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or "no details"


class ImageProcessor:
    """Turns image files (paths, EncodedImage) or PIL images into the normalised [B, 3, S, S] float32 batch the vision
    tower expects. Files are opened with open_image, under this processor's pixel limit.

    The whole image is squashed to S x S (aspect ratio not kept) rather than centre-cropped, because that is what
    every TinyGPT-V stage trained on; a crop would drop content the model was used to seeing (e.g. boxes near edges
    in stage 4)."""

    def __init__(self, cfg: VisionConfig, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.image_size = cfg.image_size
        self.max_pixels = max_pixels
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)

    def open(self, source, name: str | None = None) -> Image.Image:
        """open_image with this processor's limit and draft size: for callers that check an image before using it."""
        return open_image(source, name=name, max_pixels=self.max_pixels, draft_size=self.image_size)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        if isinstance(images, (str, Path, EncodedImage, Image.Image)):
            images = [images]
        return torch.stack([self._one(image) for image in images])  # [B, 3, S, S]

    def _one(self, image: ImageInput) -> torch.Tensor:
        image = to_rgb(image) if isinstance(image, Image.Image) else self.open(image)
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # [S, S, 3] uint8
        pixels = pixels.permute(2, 0, 1).to(torch.float32) / 255.0  # [3, S, S] in [0, 1]
        return (pixels - self.mean) / self.std  # [3, S, S]
