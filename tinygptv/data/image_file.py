# Opening image files, the first step of the data path (file or bytes -> [open_image] -> ImageProcessor -> vision
# tower -> ...). Every entry point (ask/chat, serve, the web demo, training, eval) decodes images here, under one pixel
# limit, with one set of conversions, and with one-line errors naming the image. Light (Pillow only): the command line
# imports it to check an image before a model loads.
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import IO, NamedTuple

from PIL import Image, ImageOps, UnidentifiedImageError

# The largest image accepted, in pixels, checked from the header before anything is decoded. The model sees at most
# 448 x 448; 50 MP takes every camera and phone photo up to the 50 MP sensors, and decodes to at most 150 MB of
# RGB. Pillow's own guard only warns at 89 MP and refuses at 179 MP.
DEFAULT_MAX_PIXELS = 50_000_000
# A large JPEG is decoded at 1/2, 1/4 or 1/8 scale (Image.draft), as long as both sides stay at least this many times
# the model's input size: the bicubic resize that follows then still has twice the pixels it keeps.
DRAFT_MARGIN = 2
# The formats accepted. Pillow can open many more (EPS runs Ghostscript, some are rarely fuzzed); an input of the
# model is a photo or a screenshot. JPEG includes MPO, what many phone cameras write (a JPEG with a second frame).
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")


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
            # Pillow warns from 89 MP: the limit below decides instead, naming the size (and nothing reaches stderr)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
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
    except Image.DecompressionBombError:  # Pillow refuses from 179 MP before the size can be read
        raise ImageTooLarge(f"{name}: the image has more than {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} "
                            f"megapixels, above the limit of {max_pixels / 1e6:g}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image in a supported format ({', '.join(FORMATS)})") from None
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode the image") from None
    except Exception as e:  # a malformed file: OSError, SyntaxError, struct.error, ValueError, IndexError...
        raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {_one_line(e)})") from None


def check_image(source: str | Path | EncodedImage, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Every check open_image makes (format, pixel count, a file that ends early) at the least decoding cost (a JPEG at
    1/8 scale), for commands that want a bad image to fail before a model loads."""
    open_image(source, max_pixels=max_pixels, draft_size=1)


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of an opened image. 16-bit grey is scaled down rather than clipped (which would turn most of
    it white); transparency is composited on white, the background most screenshots and logos assume."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        high = image.getextrema()[1]
        if image.mode == "F":
            image = image.point(lambda v: v * 255) if high <= 1.0 else image
        else:
            wide = image.mode.startswith("I;16") or high > 255
            image = image.convert("I")
            image = image.point(lambda v: v * (1 / 257)) if wide else image
        return image.convert("L").convert("RGB")  # values outside 0..255 are clipped
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or "no details"
