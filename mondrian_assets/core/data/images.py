"""Image facts (content hash, upright size, decodability) and the one resize the app applies before inference."""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from mondrian_assets.core import atomic

APP_MAX_SIDE = 800  # the app shrinks every upload to at most 800 px on the long side before inference
# Raster formats a photo upload comes in (JPEG includes the iPhone's multi-picture MPO files). Nothing else is
# ever decoded: EPS and PDF, for one, would run Ghostscript on the app's files.
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
MAX_IMAGE_PIXELS = 100_000_000  # twice a 48 MP phone photo; above it a file is a decompression bomb, not a photo
MAX_IMAGE_BYTES = 200 * 1024 * 1024


@dataclass(frozen=True)
class ImageFacts:
    sha256: str | None
    width: int = 0
    height: int = 0
    error: str | None = None  # a skip-reason code when the file is unusable
    detail: str = ""


def inspect_image(path: Path) -> ImageFacts:
    """Hash the bytes and prove they decode; JPEGs decode at reduced scale (draft) so 12 MP photos stay cheap."""
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            return ImageFacts(None, error="image_too_large", detail=f"{size} bytes, at most {MAX_IMAGE_BYTES}")
        data = path.read_bytes()
    except OSError as exc:
        return ImageFacts(None, error="image_unreadable", detail=str(exc))
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data), formats=PHOTO_FORMATS) as img:
            orientation = img.getexif().get(0x0112, 1)
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:  # checked from the header, before a single pixel is decoded
                return ImageFacts(digest, error="image_too_large", detail=f"{width}x{height} px")
            img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        # Pillow names the in-memory buffer by its address; the file's name keeps the detail reproducible
        message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", path.name, str(exc))
        return ImageFacts(digest, error="image_undecodable", detail=f"{type(exc).__name__}: {message}")
    if orientation in (5, 6, 7, 8):  # EXIF rotations by 90 degrees swap the upright sides
        width, height = height, width
    return ImageFacts(digest, width, height)


def app_view(img: Image.Image, max_side: int = APP_MAX_SIDE) -> Image.Image:
    """What the model sees of an image: EXIF orientation applied, transparency on white, RGB, at most `max_side`
    px on the long side (what the app does before inference)."""
    upright = ImageOps.exif_transpose(img)
    if upright.mode in ("RGBA", "LA", "P"):
        rgba = upright.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        upright = flat
    rgb = upright.convert("RGB")
    rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return rgb


def prepared_image(source: Path, sha256: str, cache_dir: Path, max_side: int = APP_MAX_SIDE) -> Path:
    """The image as serving sees it (`app_view`), as a JPEG file cached by content."""
    target = cache_dir / f"{sha256[:32]}_{max_side}.jpg"
    if target.exists():
        return target
    with Image.open(source) as img:
        buffer = io.BytesIO()
        app_view(img, max_side).save(buffer, format="JPEG", quality=95)
    atomic.write_bytes(target, buffer.getvalue())
    return target
