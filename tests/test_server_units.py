"""Server pieces without a model: stop strings over deltas, image URL handling (data:, remote
fetch limits and address checks, with a mock transport and resolver: no network), error bodies."""

from __future__ import annotations

import asyncio
import base64
import itertools
import struct
import zlib
from typing import ClassVar

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nova.server.media import (
    MediaError,
    MediaPolicy,
    decode_data_url,
    fetch_remote,
    is_public_address,
    load_image_url,
    open_image,
)
from nova.server.stops import StopMatcher, single_token_stop_ids

# --------------------------------------------------------------------------------------------
# Stop strings
# --------------------------------------------------------------------------------------------


def reference_stop(text: str, stops: list[str]) -> str:
    """Text before the stop string that completes first (ties: the earlier start)."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best):
            best = (i + len(s), i)
    return text if best is None else text[: best[1]]


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="ab.c", max_size=30),
    stops=st.lists(st.text(alphabet="ab.c", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_stop_matcher_is_chunking_independent(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    m = StopMatcher(stops)
    emitted = []
    for chunk in chunks:
        out = m.feed(chunk)
        emitted.append(out)
        joined = "".join(emitted)
        assert not any(s in joined for s in stops)  # nothing emitted ever holds a stop string
    emitted.append(m.flush())
    assert "".join(emitted) == reference_stop(text, stops)


def test_stop_matcher_holds_back_only_possible_starts():
    m = StopMatcher(["</end>"])
    assert m.feed("hello </") == "hello "
    assert m.feed("b>") == "</b>"
    assert m.feed(" x </en") == " x "
    assert m.feed("d> tail") == "" and m.stopped
    assert m.flush() == ""
    assert StopMatcher([]).feed("abc") == "abc"


def test_single_token_stop_ids_round_trip():
    class Tok:
        vocab: ClassVar[dict[str, int]] = {"Paris": 7, ".": 3}

        def encode(self, s, add_special_tokens=False):
            return [self.vocab[s]] if s in self.vocab else [1] * len(s)

        def decode(self, ids):
            inv = {v: k for k, v in self.vocab.items()}
            return "".join(inv.get(i, "?") for i in ids)

    assert single_token_stop_ids(Tok(), ["Paris", ".", "no", "."]) == (7, 3)
    assert single_token_stop_ids(None, ["."]) == ()


# --------------------------------------------------------------------------------------------
# data: URLs and decoding
# --------------------------------------------------------------------------------------------


def png_bytes(width=4, height=3) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data): a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_data_urls():
    data = png_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert decode_data_url(url, 10_000) == data
    assert decode_data_url(url.replace("base64,", "base64,\n"), 10_000) == data
    for bad, needle in [
        ("data:image/png;base64", "separat"),
        ("data:image/png,abc", "base64"),
        ("data:text/plain;base64,aGk=", "not an image"),
        ("data:image/png;base64,@@@", "base64"),
        ("data:image/png;base64,", "empty"),
    ]:
        with pytest.raises(MediaError, match=needle):
            decode_data_url(bad, 10_000)
    with pytest.raises(MediaError, match="exceeds") as exc:
        decode_data_url(url, 10)
    assert exc.value.code == "image_too_large"


def test_open_image_checks_pixels_before_decoding():
    assert open_image(png_bytes(4, 3), 12).size == (4, 3)
    with pytest.raises(MediaError, match="exceeds the limit"):
        open_image(png_bytes(4, 3), 11)
    with pytest.raises(MediaError, match="exceeds the limit"):
        open_image(png_header_only(5000, 5000), 4096 * 4096)  # refused from the header alone
    with pytest.raises(MediaError, match="too large"):
        open_image(png_header_only(100_000, 100_000), 4096 * 4096)
    with pytest.raises(MediaError, match="too large|could not be decoded"):
        open_image(png_header_only(100_000, 100_000), None)  # PIL's own bomb guard
    with pytest.raises(MediaError, match="could not be decoded"):
        open_image(b"GIF89a garbage", None)
    with pytest.raises(MediaError, match="could not be decoded"):
        open_image(png_bytes()[:40], None)  # truncated


# --------------------------------------------------------------------------------------------
# Remote fetches (mock transport + resolver: nothing leaves the process)
# --------------------------------------------------------------------------------------------

HOSTS = {
    "img.example": ["93.184.216.34"],
    "cdn.example": ["2606:4700::6810:84e5"],
    "internal.example": ["10.1.2.3"],
    "mixed.example": ["93.184.216.35", "127.0.0.1"],
    "meta.example": ["169.254.169.254"],
}


async def fake_resolver(host: str, port: int) -> list[str]:
    if host not in HOSTS:
        raise OSError(f"unknown host {host}")
    return HOSTS[host]


def handler(request: httpx.Request) -> httpx.Response:
    path = request.url.path
    host = request.url.host
    assert host in HOSTS, f"request to {host} should have been refused before connecting"
    if path == "/shot.png":
        return httpx.Response(200, content=png_bytes())
    if path.startswith("/to/"):  # /to/<url-without-scheme>
        return httpx.Response(302, headers={"Location": "http://" + path[len("/to/") :]})
    if path == "/relative":
        return httpx.Response(301, headers={"Location": "/shot.png"})
    if path == "/loop":
        return httpx.Response(302, headers={"Location": "/loop"})
    if path == "/big-declared":
        return httpx.Response(200, headers={"Content-Length": "999999999"}, content=b"x")
    if path == "/big-chunked":

        async def body():
            for _ in range(100):
                yield b"x" * 1024

        return httpx.Response(200, content=body())
    return httpx.Response(404)


async def slow_handler(request: httpx.Request) -> httpx.Response:
    await asyncio.sleep(5)
    return httpx.Response(200, content=png_bytes())


def fetch(url: str, policy: MediaPolicy | None = None, transport=None) -> bytes:
    policy = policy or MediaPolicy(allow_remote_media=True, max_media_bytes=10_000)

    async def go():
        async with httpx.AsyncClient(transport=transport or httpx.MockTransport(handler)) as client:
            return await fetch_remote(url, policy, client, fake_resolver)

    return asyncio.run(go())


def test_remote_fetch_of_a_public_host():
    assert fetch("http://img.example/shot.png") == png_bytes()
    assert fetch("https://cdn.example/shot.png") == png_bytes()
    assert fetch("http://img.example/relative") == png_bytes()
    assert fetch("http://img.example/to/cdn.example/shot.png") == png_bytes()


@pytest.mark.parametrize(
    "url,needle",
    [
        ("http://127.0.0.1/shot.png", "non-public"),
        ("http://[::1]/shot.png", "non-public"),
        ("http://[::ffff:127.0.0.1]/shot.png", "non-public"),
        ("http://internal.example/shot.png", "non-public"),
        ("http://mixed.example/shot.png", "non-public"),
        ("http://meta.example/latest", "non-public"),
        ("http://img.example/to/127.0.0.1/shot.png", "non-public"),  # redirect to loopback
        (
            "http://img.example/to/internal.example/shot.png",
            "non-public",
        ),  # redirect to a private net
        ("http://img.example/to/10.0.0.1:8080/x", "non-public"),
        ("http://img.example/loop", "redirects"),
        ("http://img.example/big-declared", "limit"),
        ("http://img.example/big-chunked", "limit"),
        ("http://img.example/missing", "HTTP 404"),
        ("http://nowhere.example/x", "cannot resolve"),
        ("ftp://img.example/x", "unsupported"),
    ],
)
def test_remote_fetch_refusals(url, needle):
    with pytest.raises(MediaError, match=needle):
        fetch(url)


def test_remote_fetch_time_limit():
    policy = MediaPolicy(allow_remote_media=True, fetch_timeout_s=0.2)
    with pytest.raises(MediaError, match="longer than 0.2 s"):
        fetch("http://img.example/shot.png", policy, httpx.MockTransport(slow_handler))


def test_public_address_classification():
    for addr in (
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "100.64.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:10.0.0.1",
        "224.0.0.1",
    ):
        assert not is_public_address(addr), addr
    for addr in ("93.184.216.34", "8.8.8.8", "2606:4700::6810:84e5"):
        assert is_public_address(addr), addr


def test_remote_media_is_off_by_default():
    async def go():
        return await load_image_url("http://img.example/shot.png", MediaPolicy())

    with pytest.raises(MediaError, match="allow-remote-media"):
        asyncio.run(go())


# --------------------------------------------------------------------------------------------
# Error bodies
# --------------------------------------------------------------------------------------------


def test_validation_error_params():
    from nova.server.errors import loc_to_param

    assert loc_to_param(("body", "messages", 0, "role")) == "messages[0].role"
    assert (
        loc_to_param(
            (
                "body",
                "messages",
                0,
                "user",
                "content",
                "list[tagged-union[TextPart,ImagePart]]",
                1,
                "image_url",
                "image_url",
                "url",
            )
        )
        == "messages[0].content[1].image_url.url"
    )
    assert (
        loc_to_param(("body", "messages", 2, "assistant", "content", "list[x]", 0, "text", "text"))
        == "messages[2].content[0].text"
    )
    assert loc_to_param(("body", "prompt", "list[int]", 3)) == "prompt[3]"
    assert loc_to_param(("body", "stop", "str")) == "stop"
    assert loc_to_param(("body",)) is None
