"""An uploaded image, checked before any model sees it: size, pixel count (decompression bombs), decodability.

Each problem is an `UploadRejected` carrying the HTTP status and a message saying what to fix. A good upload is
turned into what the app's own service feeds its model (EXIF orientation applied, RGB, at most 800 px).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from mondrian_assets.core.data.images import APP_MAX_SIDE, MAX_IMAGE_PIXELS, PHOTO_FORMATS, app_view


class UploadRejected(ValueError):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class PreparedUpload:
    sha256: str  # of the bytes as uploaded
    jpeg: bytes  # the model's view of it
    width: int  # as uploaded (before orientation)
    height: int
    format: str


def prepare_upload(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS, max_side: int = APP_MAX_SIDE) -> PreparedUpload:
    if not data:
        raise UploadRejected(400, "empty_image", "the `image` part is empty")
    digest = hashlib.sha256(data).hexdigest()
    try:
        image = Image.open(io.BytesIO(data), formats=PHOTO_FORMATS)  # the header only; never EPS, PDF & co.
    except Image.DecompressionBombError as exc:  # PIL's own guard, past twice its pixel limit
        raise UploadRejected(413, "too_many_pixels", str(exc)) from None
    except UnidentifiedImageError:
        formats = ", ".join(PHOTO_FORMATS)
        raise UploadRejected(415, "not_an_image", f"the `image` part is not a photo ({formats})") from None
    except (OSError, ValueError) as exc:
        raise UploadRejected(400, "unreadable_image", f"the image header cannot be read: {exc}") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise UploadRejected(
                413, "too_many_pixels",
                f"the image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}",
            )  # fmt: skip
        try:
            if image.format == "JPEG":
                image.draft("RGB", (max_side, max_side))  # decode at reduced scale: the model sees <= max_side
            image.load()
            view = app_view(image, max_side)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise UploadRejected(400, "corrupt_image", f"the image does not decode (truncated or corrupt?): {exc}") from None
        buffer = io.BytesIO()
        view.save(buffer, format="JPEG", quality=95)
        return PreparedUpload(digest, buffer.getvalue(), width, height, str(image.format))
