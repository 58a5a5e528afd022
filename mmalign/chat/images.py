"""Safe decoding of images sent to the server.

Only `data:` URLs are decoded by default; `file://`, local paths and anything else are refused,
and remote `http(s)` URLs are fetched only when the server allows it, with a size and time
limit. The pixel count is checked from the header before any pixel is decoded (decompression
bombs), and PIL's own limit is set to the same value.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
import urllib.request
import warnings
from dataclasses import dataclass

from PIL import Image

MAX_PIXELS = 4096 * 4096
MAX_BYTES = 20 * 1024 * 1024
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,(?P<data>.*)$",
                       re.DOTALL)  # fmt: skip


class ImageError(ValueError):
    """An image the server will not or cannot use; `code` names the reason for the client."""

    def __init__(self, message: str, code: str = "invalid_image"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ImagePolicy:
    allow_remote: bool = False
    max_pixels: int = MAX_PIXELS
    max_bytes: int = MAX_BYTES
    timeout_s: float = 10.0


def set_pil_limit(max_pixels: int = MAX_PIXELS) -> None:
    """PIL warns above its MAX_IMAGE_PIXELS and raises above twice it; we refuse above it
    ourselves, so set PIL's to the same value (a process-wide setting: the server calls it)."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def load_image_url(url: str, policy: ImagePolicy = ImagePolicy()) -> Image.Image:
    """An RGB image from a `data:` URL (or `http(s)` when allowed); ImageError otherwise."""
    if not isinstance(url, str) or not url:
        raise ImageError("image_url.url must be a non-empty string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_image(_data_url_bytes(url, policy.max_bytes), policy.max_pixels)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise ImageError("remote image URLs are refused; send the image as a base64 data: URL "
                             "(or start the server with --allow-remote-images)", "remote_images_disabled")  # fmt: skip
        return decode_image(_fetch(url, policy), policy.max_pixels)
    raise ImageError(f"unsupported image URL scheme {scheme or 'none (a local path?)'!r}: only data: URLs "
                     "(and http(s) with --allow-remote-images) are accepted", "unsupported_image_url")  # fmt: skip


def _data_url_bytes(url: str, max_bytes: int) -> bytes:
    m = _DATA_URL.match(url)
    if m is None:
        raise ImageError("malformed data: URL (expected data:image/<type>;base64,<data>)")
    if m["mime"] and not m["mime"].lower().startswith("image/"):
        raise ImageError(f"data: URL has media type {m['mime']!r}, not an image")
    if not m["b64"]:
        raise ImageError("data: URL is not base64-encoded (expected ;base64,)")
    data = m["data"].strip()
    if len(data) * 3 // 4 > max_bytes:
        raise ImageError(f"image is over {max_bytes} bytes", "image_too_large")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"bad base64 in data: URL ({e})", "invalid_base64") from None


def _fetch(url: str, policy: ImagePolicy) -> bytes:
    """GET with a deadline for the whole transfer and a byte cap, whatever the server says."""
    deadline = time.monotonic() + policy.timeout_s
    req = urllib.request.Request(url, headers={"User-Agent": "mmalign-server"})
    chunks, size = [], 0
    try:
        with urllib.request.urlopen(req, timeout=policy.timeout_s) as resp:  # noqa: S310 (scheme checked)
            while chunk := resp.read1(64 * 1024):  # what has arrived: the deadline is checked often
                size += len(chunk)
                if size > policy.max_bytes:
                    raise ImageError(f"remote image is over {policy.max_bytes} bytes", "image_too_large")
                if time.monotonic() > deadline:
                    raise ImageError(f"remote image took over {policy.timeout_s} s", "image_fetch_timeout")
                chunks.append(chunk)
    except ImageError:
        raise
    except (OSError, ValueError) as e:
        raise ImageError(f"cannot fetch image {url[:200]!r}: {e}", "image_fetch_failed") from None
    return b"".join(chunks)


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB image; the size is read from the header and refused above `max_pixels`
    before any decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}",
                                 "image_too_large")  # fmt: skip
            im.load()
            return im.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image refused as a decompression bomb: {e}", "image_too_large") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ImageError(f"not a readable image: {e}") from None
