"""Safe image decoding: only data: URLs by default, limits on pixels, bytes and time."""

from __future__ import annotations

import base64
import http.server
import io
import threading
import time
import urllib.request

import pytest
from PIL import Image

from mmalign.chat.images import (
    ImageError,
    ImagePolicy,
    _CheckedRedirects,
    check_remote_url,
    decode_image,
    load_image_url,
)


def png(size=(20, 10), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 120).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_data_url_decodes_to_rgb():
    im = load_image_url(data_url(png(mode="L")))
    assert im.mode == "RGB" and im.size == (20, 10)
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (250, 0, 0)).save(jpeg, "JPEG")
    assert load_image_url(data_url(jpeg.getvalue(), "image/jpeg")).size == (8, 8)


@pytest.mark.parametrize(
    "url, code",
    [
        ("file:///etc/passwd", "unsupported_image_url"),
        ("/etc/passwd", "unsupported_image_url"),
        ("C:\\images\\cat.png", "unsupported_image_url"),
        ("ftp://host/cat.png", "unsupported_image_url"),
        ("http://127.0.0.1:9/cat.png", "remote_images_disabled"),
        ("https://example.com/cat.png", "remote_images_disabled"),
        ("data:image/png;base64,%%%", "invalid_base64"),
        ("data:image/png;base64,aGVsbG8", "invalid_base64"),  # bad padding
        ("data:image/png," + "x" * 10, "invalid_image"),  # not base64
        ("data:text/plain;base64," + base64.b64encode(png()).decode(), "invalid_image"),
        (data_url(b"GIF89a but not really"), "invalid_image"),
        (data_url(png()[:40]), "invalid_image"),  # truncated
    ],
)
def test_refused_urls(url, code):
    with pytest.raises(ImageError) as e:
        load_image_url(url)
    assert e.value.code == code


def test_pixel_limit_is_checked_before_decoding():
    big = png((3000, 3000))  # a few kB compressed, 9 Mpx decoded
    assert len(big) < 100_000
    with pytest.raises(ImageError, match="over the limit") as e:
        decode_image(big, max_pixels=1000 * 1000)
    assert e.value.code == "image_too_large"
    assert decode_image(big, max_pixels=3000 * 3000).size == (3000, 3000)


def test_byte_limit_on_data_urls():
    with pytest.raises(ImageError) as e:
        load_image_url(data_url(png()), ImagePolicy(max_bytes=10))
    assert e.value.code == "image_too_large"


class _Files(http.server.BaseHTTPRequestHandler):
    FILES = {"/ok.png": png(), "/big.png": png() + b"\0" * 50_000}

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.split("=", 1)[1])
            self.end_headers()
            return
        if self.path == "/slow.png":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(20):  # trickles for ~2 s
                    self.wfile.write(b"\0" * 10)
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:  # the client gave up, as it should
                pass
            return
        body = self.FILES.get(self.path)
        self.send_response(200 if body else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def files():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_remote_fetch_only_when_allowed_and_limited(files):
    allow = ImagePolicy(allow_remote=True, max_bytes=20_000, timeout_s=0.5, allow_private_hosts=True)
    with pytest.raises(ImageError):
        load_image_url(files + "/ok.png")  # refused by default
    assert load_image_url(files + "/ok.png", allow).size == (20, 10)
    for path, code in [
        ("/big.png", "image_too_large"),
        ("/missing.png", "image_fetch_failed"),
        ("/slow.png", "image_fetch_timeout"),
    ]:
        t0 = time.monotonic()
        with pytest.raises(ImageError) as e:
            load_image_url(files + path, allow)
        assert e.value.code == code, (path, e.value)
        assert time.monotonic() - t0 < 1.5


def test_hosts_without_a_public_address_are_refused(files):
    allow = ImagePolicy(allow_remote=True, timeout_s=0.5)  # public hosts only, the default
    with pytest.raises(ImageError, match="not a public address") as e:
        load_image_url(files + "/ok.png", allow)  # the local server is on loopback
    assert e.value.code == "image_host_refused"
    for url in [
        "http://localhost/x.png",
        "http://10.1.2.3/x.png",
        "http://169.254.169.254/latest",
        "http://[::1]:8080/x.png",
        "http://[::ffff:192.168.0.1]/x.png",
        "http://0.0.0.0/x.png",
    ]:
        with pytest.raises(ImageError) as e:
            check_remote_url(url, allow)
        assert e.value.code == "image_host_refused", url
    check_remote_url("http://8.8.8.8/x.png", allow)  # a public literal address passes (nothing is fetched)


def test_every_redirect_hop_is_checked(files):
    allow = ImagePolicy(allow_remote=True, timeout_s=0.5)
    handler = _CheckedRedirects(allow)
    req = urllib.request.Request("http://8.8.8.8/a.png")
    for location, code in [
        ("ftp://8.8.8.8/cat.png", "unsupported_image_url"),
        ("http://127.0.0.1/cat.png", "image_host_refused"),
        ("//10.0.0.1/cat.png", "image_host_refused"),
    ]:
        with pytest.raises(ImageError) as e:
            handler.redirect_request(req, None, 302, "Found", {}, location)
        assert e.value.code == code, location
    assert handler.redirect_request(req, None, 302, "Found", {}, "http://8.8.8.8/b.png").full_url.endswith("/b.png")
    # through a real fetch: a redirect to ftp:// is refused even where private hosts are allowed,
    # and an allowed redirect is followed
    local = ImagePolicy(allow_remote=True, timeout_s=0.5, allow_private_hosts=True)
    with pytest.raises(ImageError) as e:
        load_image_url(files + "/redirect?to=ftp://127.0.0.1/ok.png", local)
    assert e.value.code == "unsupported_image_url"
    assert load_image_url(files + "/redirect?to=/ok.png", local).size == (20, 10)


def test_pil_bomb_limit_is_not_changed_and_maps_to_image_too_large(monkeypatch):
    before = Image.MAX_IMAGE_PIXELS
    decode_image(png(), max_pixels=10**9)
    assert Image.MAX_IMAGE_PIXELS == before  # no process-wide setting is touched
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL raises above twice its limit
    with pytest.raises(ImageError) as e:
        decode_image(png((20, 20)), max_pixels=10**9)
    assert e.value.code == "image_too_large" and "decompression bomb" in str(e.value)
