# Hostile and awkward files for the bad-input suite, generated on the spot: decompression bombs (a tiny PNG that
# declares a huge size), truncated files, photos with an EXIF rotation, 16-bit / CMYK / palette / transparent images,
# and a pickle whose __reduce__ would run code if anything ever unpickled it without restriction.
from __future__ import annotations

import io
import pickle
import struct
import zlib
from pathlib import Path

from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of width x height, all black: a few kB to 110 kB on disk, gigabytes once decoded."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return path


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def truncated(path: Path, data: bytes, keep: float = 0.5) -> Path:
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def noisy_image(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    """Noise, so a truncated PNG of it really is missing pixels (a flat image compresses into its first bytes)."""
    return Image.effect_noise(size, 64 + seed).convert("RGB")


def rotated_photo(path: Path) -> Path:
    """A 40 x 20 JPEG, red on the left, blue on the right, tagged EXIF orientation 6 (rotate 90 degrees clockwise to
    view): upright it is 20 x 40 with red at the top."""
    image = Image.new("RGB", (40, 20), (220, 20, 20))
    image.paste((20, 20, 220), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, format="JPEG", exif=exif, quality=95)
    return path


def grey16_png(path: Path) -> Path:
    """A 16-bit greyscale gradient from 0 to 65535 (left to right)."""
    width = 64
    row = b"".join(struct.pack(">H", x * 65535 // (width - 1)) for x in range(width))
    raw = b"".join(b"\0" + row for _ in range(8))
    header = struct.pack(">IIBBBBB", width, 8, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw))
                     + _chunk(b"IEND", b""))
    return path


def cmyk_jpeg(path: Path) -> Path:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, format="JPEG")  # pure red in CMYK
    return path


def transparent_png(path: Path, mode: str = "RGBA") -> Path:
    """Fully transparent black pixels (RGBA), or a palette image whose one colour is transparent (P)."""
    if mode == "P":
        image = Image.new("P", (16, 16), 0)
        image.putpalette([0, 0, 0] * 256)
        image.save(path, format="PNG", transparency=0)
    else:
        Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(path, format="PNG")
    return path


def big_jpeg(path: Path, size: tuple[int, int] = (4000, 3000)) -> Path:
    Image.new("RGB", size, (30, 120, 200)).save(path, format="JPEG")
    return path


class RunsCode:
    """Unpickling this calls open(marker, "w"): proof that code ran, without doing harm."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def malicious_pickle(path: Path, marker: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"model": RunsCode(marker)}, f)
    return path
