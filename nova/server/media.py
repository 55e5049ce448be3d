"""Image inputs of chat requests: ``data:`` URLs, remote ``http(s)`` URLs (opt-in) and local
``file://`` paths (opt-in, under one directory), decoded into checked PIL images.

Every failure raises ``MediaError`` (an ``InvalidInputError``) whose message names the problem;
the server answers it with HTTP 400.

Remote fetches (``--allow-remote-media``) are bounded in size and total time, follow at most
``max_redirects`` redirects one hop at a time, and refuse any hop whose host is or resolves to a
non-public address (loopback, private, link-local, reserved, multicast, unspecified), so a request
cannot make the server reach into its own network. Known limit: the address is checked at
resolution, and httpx resolves again when it connects (a DNS-rebinding race remains).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from nova.models.errors import InvalidInputError

Resolver = Callable[[str, int], Awaitable[list[str]]]


class MediaError(InvalidInputError):
    def __init__(self, message: str, code: str = "invalid_image") -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class MediaPolicy:
    max_image_pixels: int | None = 4096 * 4096
    max_media_bytes: int = 20 * 1024 * 1024
    allow_remote_media: bool = False
    fetch_timeout_s: float = 10.0
    max_redirects: int = 3
    allowed_local_media_path: str | None = None


def _short(url: str, limit: int = 80) -> str:
    return url if len(url) <= limit else url[:limit] + "..."


# --------------------------------------------------------------------------------------------
# data: URLs
# --------------------------------------------------------------------------------------------


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """``data:[<mediatype>][;base64],<data>`` -> bytes; only base64 payloads are accepted."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise MediaError("data URL has no ',' separating the header from the payload")
    params = header[len("data:") :].split(";")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise MediaError("data URL must be base64-encoded (data:image/png;base64,...)")
    mime = params[0].strip().lower()
    if mime and not mime.startswith("image/") and mime != "application/octet-stream":
        raise MediaError(f"data URL media type {mime!r} is not an image type")
    payload = "".join(payload.split())  # tolerate line breaks in the base64 text
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise MediaError(f"image payload exceeds the limit of {max_bytes} bytes", "image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"data URL payload is not valid base64: {exc}") from exc
    if not data:
        raise MediaError("data URL payload is empty")
    return data


# --------------------------------------------------------------------------------------------
# file:// URLs
# --------------------------------------------------------------------------------------------


def read_local_file(url: str, allowed_root: str | None, max_bytes: int) -> bytes:
    if allowed_root is None:
        raise MediaError(
            "file:// image URLs are disabled; start the server with "
            "--allowed-local-media-path DIR to allow files under DIR",
            "media_not_allowed",
        )
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError(f"file URL with a remote host is not supported: {_short(url)}")
    path = Path(unquote(parts.path))
    root = Path(os.path.realpath(allowed_root))
    real = Path(os.path.realpath(path))
    if not path.is_absolute() or not real.is_relative_to(root):
        raise MediaError(f"file {path} is outside the allowed media directory", "media_not_allowed")
    try:
        if not real.is_file():
            raise MediaError(f"image file not found: {path}")
        size = real.stat().st_size
        if size > max_bytes:
            raise MediaError(
                f"image file {path} has {size} bytes; the limit is {max_bytes}", "image_too_large"
            )
        with open(real, "rb") as f:
            return f.read(max_bytes + 1)
    except OSError as exc:
        raise MediaError(f"cannot read image file {path}: {exc.strerror or exc}") from exc


# --------------------------------------------------------------------------------------------
# http(s) URLs
# --------------------------------------------------------------------------------------------


def is_public_address(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def system_resolver(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


async def check_public_host(host: str, port: int, resolver: Resolver) -> None:
    try:
        addrs = [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        try:
            addrs = await resolver(host, port)
        except OSError as exc:
            raise MediaError(f"cannot resolve image host {host!r}: {exc}") from exc
    if not addrs:
        raise MediaError(f"image host {host!r} has no address")
    bad = [a for a in addrs if not is_public_address(a)]
    if bad:
        raise MediaError(
            f"image host {host!r} is a non-public address ({bad[0]}); refused", "media_not_allowed"
        )


async def fetch_remote(
    url: str,
    policy: MediaPolicy,
    client: httpx.AsyncClient | None = None,
    resolver: Resolver | None = None,
) -> bytes:
    """GET an image over http(s) within the policy's limits (see the module docstring)."""
    resolver = resolver or system_resolver
    own = client is None
    client = client or httpx.AsyncClient(follow_redirects=False, trust_env=False)
    try:
        async with asyncio.timeout(policy.fetch_timeout_s):
            return await _fetch(url, policy, client, resolver)
    except TimeoutError as exc:
        raise MediaError(
            f"fetching {_short(url)} took longer than {policy.fetch_timeout_s:g} s"
        ) from exc
    except httpx.HTTPError as exc:
        raise MediaError(f"fetching {_short(url)} failed: {exc.__class__.__name__}: {exc}") from exc
    finally:
        if own:
            await client.aclose()


async def _fetch(
    url: str, policy: MediaPolicy, client: httpx.AsyncClient, resolver: Resolver
) -> bytes:
    for _hop in range(policy.max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MediaError(f"unsupported image URL: {_short(url)}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        await check_public_host(parts.hostname, port, resolver)
        async with client.stream("GET", url, follow_redirects=False) as resp:
            if resp.is_redirect:
                location = resp.headers.get("location")
                if not location:
                    raise MediaError(f"redirect from {_short(url)} has no Location")
                url = urljoin(url, location)
                continue
            if resp.status_code != 200:
                raise MediaError(f"fetching {_short(url)} gave HTTP {resp.status_code}")
            declared = resp.headers.get("content-length")
            if (
                declared is not None
                and declared.isdigit()
                and int(declared) > policy.max_media_bytes
            ):
                raise MediaError(
                    f"image at {_short(url)} has {declared} bytes; the limit is "
                    f"{policy.max_media_bytes}",
                    "image_too_large",
                )
            buf = bytearray()
            async for chunk in resp.aiter_bytes():
                buf += chunk
                if len(buf) > policy.max_media_bytes:
                    raise MediaError(
                        f"image at {_short(url)} exceeds the limit of "
                        f"{policy.max_media_bytes} bytes",
                        "image_too_large",
                    )
            return bytes(buf)
    raise MediaError(f"more than {policy.max_redirects} redirects fetching the image")


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def open_image(data: bytes, max_pixels: int | None) -> Any:
    """Bytes -> RGB PIL image; the pixel limit is checked from the header, before decoding."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width < 1 or height < 1:
                raise MediaError(f"image has no pixels ({width}x{height})")
            if max_pixels is not None and width * height > max_pixels:
                raise MediaError(
                    f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels",
                    "image_too_large",
                )
            image.load()
            return image.convert("RGB")
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image is too large to decode: {exc}", "image_too_large") from exc
    except Exception as exc:
        raise MediaError(f"image bytes could not be decoded as an image: {exc}") from exc


async def load_image_url(
    url: str,
    policy: MediaPolicy,
    client: httpx.AsyncClient | None = None,
    resolver: Resolver | None = None,
) -> bytes:
    """The raw bytes behind one ``image_url``."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        if len(url) > 256 * 1024:  # keep the event loop free of big base64 decodes
            return await asyncio.to_thread(decode_data_url, url, policy.max_media_bytes)
        return decode_data_url(url, policy.max_media_bytes)
    if scheme == "file":
        return await asyncio.to_thread(
            read_local_file, url, policy.allowed_local_media_path, policy.max_media_bytes
        )
    if scheme in ("http", "https"):
        if not policy.allow_remote_media:
            raise MediaError(
                "remote image URLs are disabled; send a data: URL or start the server "
                "with --allow-remote-media",
                "media_not_allowed",
            )
        return await fetch_remote(url, policy, client, resolver)
    raise MediaError(f"unsupported image URL scheme {scheme!r}: use data:, http(s): or file:")
