"""Safe decoding of images sent to the server.

Only `data:` URLs are decoded by default; `file://`, local paths and anything else are refused,
and remote `http(s)` URLs are fetched only when the server allows it, with a size and time
limit, and only from hosts with public addresses: every hop of a redirect is checked again
(http(s) only; no loopback, private, link-local or reserved address), so a client cannot make
the server reach into its own network. The pixel count is checked from the header before any
pixel is decoded (decompression bombs); PIL's own bomb errors give the same error.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import re
import socket
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass

from PIL import Image

MAX_PIXELS = 4096 * 4096
MAX_BYTES = 20 * 1024 * 1024
_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,(?P<data>.*)$", re.DOTALL
)


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
    allow_private_hosts: bool = False  # fetch from loopback / private addresses too (tests, internal stores)


def load_image_url(url: str, policy: ImagePolicy = ImagePolicy()) -> Image.Image:
    """An RGB image from a `data:` URL (or `http(s)` when allowed); ImageError otherwise."""
    if not isinstance(url, str) or not url:
        raise ImageError("image_url.url must be a non-empty string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_image(_data_url_bytes(url, policy.max_bytes), policy.max_pixels)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise ImageError(
                "remote image URLs are refused; send the image as a base64 data: URL "
                "(or start the server with --allow-remote-images)",
                "remote_images_disabled",
            )
        return decode_image(_fetch(url, policy), policy.max_pixels)
    raise ImageError(
        f"unsupported image URL scheme {scheme or 'none (a local path?)'!r}: only data: URLs "
        "(and http(s) with --allow-remote-images) are accepted",
        "unsupported_image_url",
    )


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


def check_remote_url(url: str, policy: ImagePolicy) -> None:
    """ImageError unless `url` is http(s) and its host resolves only to public addresses.
    (The address is resolved again when connecting: a DNS answer that changes in between is
    not caught; the server's own network should not rely on this check alone.)"""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ImageError(f"image URL {url[:200]!r}: only http(s) URLs are fetched", "unsupported_image_url")
    if not parts.hostname:
        raise ImageError(f"image URL {url[:200]!r} has no host", "unsupported_image_url")
    if policy.allow_private_hosts:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 80, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as e:
        raise ImageError(f"cannot resolve image host {parts.hostname!r}: {e}", "image_fetch_failed") from None
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is 127.0.0.1
        # loopback, private, link-local, reserved, shared (100.64/10), unspecified: none is global
        if not ip.is_global or ip.is_multicast or ip.is_loopback or ip.is_link_local or ip.is_reserved:
            raise ImageError(
                f"image host {parts.hostname!r} resolves to {ip}, not a public address: refused", "image_host_refused"
            )


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL that passes `check_remote_url` (urllib alone follows
    any http(s)/ftp URL on any host)."""

    max_redirections = 5

    def __init__(self, policy: ImagePolicy):
        self.policy = policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        check_remote_url(urllib.parse.urljoin(req.full_url, newurl), self.policy)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, policy: ImagePolicy) -> bytes:
    """GET with a deadline for the whole transfer and a byte cap, whatever the server says;
    the URL and every redirect are checked by `check_remote_url`."""
    check_remote_url(url, policy)
    deadline = time.monotonic() + policy.timeout_s
    req = urllib.request.Request(url, headers={"User-Agent": "mmalign-server"})
    opener = urllib.request.build_opener(_CheckedRedirects(policy))
    chunks, size = [], 0
    try:
        with opener.open(req, timeout=policy.timeout_s) as resp:  # noqa: S310 (scheme checked)
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
    before any decoding. PIL's own (process-wide) bomb limit is left as it is: its error, or
    its warning where warnings are errors, gives the same image_too_large."""
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > max_pixels:
            raise ImageError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}", "image_too_large")
        im.load()
        return im.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image refused as a decompression bomb: {e}", "image_too_large") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ImageError(f"not a readable image: {e}") from None
