"""The gateway's side of images: every API's image arrives here as an OpenAI `image_url` part
of the translated chat body, and leaves as a checked data URL.

    found = image_parts(chat)            # the image parts, in prompt order (none: a text request)
    images = resolve(found, policy)      # each part's url a checked data URL; [Image(w, h, ...)]

Limits are Anthropic's (`MEDIA_TYPES`, `MAX_IMAGE_BYTES`, `MAX_IMAGES`, `MAX_SIDE`); the media
type is read from the bytes (a declared type that differs is a 400, as on Anthropic's API),
and so are the width and height, from the header alone (no decoding, no Pillow here).

URL images are fetched here, never by the model server: the host is resolved once, every
address it resolves to must be global (not loopback, link-local, private, shared, reserved or
multicast) unless it lies in a network of `image_fetch_allow`, and the connection goes to the
address that was checked (a second lookup could answer otherwise: DNS rebinding). Redirects are
followed a few times, each target checked the same way; the body is capped and timed.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import urljoin, urlsplit

from ..errors import RequestRejected, invalid

MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
MAX_IMAGE_BYTES = 5 * 1024 * 1024   # per image, as Anthropic's API
MAX_IMAGES = 100                    # per request, as Anthropic's API
MAX_SIDE = 8000                     # pixels, either side, as Anthropic's API
FETCH_TIMEOUT = 10.0                # seconds for one URL image, redirects included
MAX_REDIRECTS = 3
AT = "mlxgate_at"  # a part's place in the client's request, set by the translation, removed by `resolve`

Resolver = Callable[[str, int], list[str]]


@dataclass(frozen=True)
class Image:
    media_type: str
    width: int
    height: int
    size: int   # bytes
    where: str  # the client's field


@dataclass(frozen=True)
class FetchPolicy:
    """Which addresses URL images may come from besides the global ones (`image_fetch_allow`)."""

    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    timeout: float = FETCH_TIMEOUT

    @classmethod
    def of(cls, networks: Iterable[str]) -> "FetchPolicy":
        return cls(tuple(ipaddress.ip_network(n, strict=False) for n in networks))

    def allows(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self.allow):
            return True
        return ip.is_global and not ip.is_multicast


# ------------------------------------------------------------------ what the translation writes
def part(url: str, where: str, detail: str | None = None) -> dict:
    """The chat body's image part for an image at `url` (a data URL or http(s)), from the client's `where`."""
    image_url = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"type": "image_url", "image_url": image_url, AT: where}


def data_url(media_type, data, where: str) -> str:
    """An Anthropic-style base64 source as a data URL (its media type checked against `MEDIA_TYPES`)."""
    if media_type not in MEDIA_TYPES:
        raise invalid(f"{where}.media_type: Input should be {', '.join(repr(m) for m in MEDIA_TYPES)}, got "
                      f"{str(media_type)[:40]!r}")
    if not isinstance(data, str) or not data:
        raise invalid(f"{where}.data: Field required (the image's bytes in base64)")
    return f"data:{media_type};base64,{data}"


def image_parts(chat: dict) -> list[dict]:
    """The image parts of a chat body's messages, in prompt order."""
    return [p for m in chat.get("messages") or () if isinstance(m.get("content"), list)
            for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url"]


# ------------------------------------------------------------------ checking and fetching
def resolve(parts: list[dict], policy: FetchPolicy = FetchPolicy(), resolver: Resolver | None = None) -> list[Image]:
    """Turn each part's url into a checked data URL, in place; the images' facts in order."""
    if len(parts) > MAX_IMAGES:
        raise invalid(f"too many images: {len(parts)} in this request; at most {MAX_IMAGES}")
    images = []
    for n, found in enumerate(parts):
        where = found.pop(AT, None) or f"image {n + 1}"
        url = (found.get("image_url") or {}).get("url")
        if not isinstance(url, str):
            raise invalid(f"{where}: the image needs a url (a data URL or an http(s) URL)")
        declared, data = _bytes_of(url, where, policy, resolver)
        media_type, width, height = sniff(data, where)
        if declared and declared != media_type:
            raise invalid(f"{where}: the image was declared {declared} but its bytes are {media_type}")
        if width > MAX_SIDE or height > MAX_SIDE:
            raise invalid(f"{where}: the image is {width}x{height} pixels; at most {MAX_SIDE} on either side")
        if declared != media_type:  # a fetched image, or an undeclared type: encoded with the type it has
            found["image_url"] = {**found["image_url"], "url": f"data:{media_type};base64,"
                                                               f"{base64.b64encode(data).decode()}"}
        images.append(Image(media_type, width, height, len(data), where))
    return images


def _bytes_of(url: str, where: str, policy: FetchPolicy, resolver: Resolver | None) -> tuple[str | None, bytes]:
    """(declared media type or None, the bytes) of a data URL or an http(s) URL."""
    if url.startswith("data:"):
        head, comma, payload = url[5:].partition(",")
        if not comma or not head.endswith(";base64"):
            raise invalid(f"{where}: a data URL image must be base64 (data:image/png;base64,...)")
        declared = head[:-len(";base64")] or None
        if declared is not None and declared not in MEDIA_TYPES:
            raise invalid(f"{where}: media type {declared[:40]!r} is not supported; send "
                          f"{', '.join(MEDIA_TYPES)}")
        if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise _too_large(where, len(payload) * 3 // 4)
        try:
            data = binascii.a2b_base64(payload, strict_mode=True)  # b64decode(validate=True), a third faster
        except (binascii.Error, ValueError):
            raise invalid(f"{where}: the image's base64 data is not valid base64") from None
        return declared, data
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return None, fetch(url, where, policy, resolver)
    raise invalid(f"{where}: an image URL must be a data URL or http(s), got {url[:40]!r}")


def _too_large(where: str, size: int) -> RequestRejected:
    return invalid(f"{where}: the image is {size} bytes; at most {MAX_IMAGE_BYTES} ({MAX_IMAGE_BYTES // 2**20} MB)")


def system_resolver(host: str, port: int) -> list[str]:
    try:
        return list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))
    except socket.gaierror as exc:
        raise invalid(f"the image URL's host {host!r} does not resolve: {exc.strerror}") from None


def fetch(url: str, where: str, policy: FetchPolicy = FetchPolicy(), resolver: Resolver | None = None) -> bytes:
    """The body of an http(s) image URL, from a checked address, within the size cap and the timeout."""
    deadline = time.monotonic() + policy.timeout
    for _ in range(MAX_REDIRECTS + 1):
        split = urlsplit(url)
        https = split.scheme.lower() == "https"
        if split.scheme.lower() not in ("http", "https") or not split.hostname:
            raise invalid(f"{where}: the image URL must be http(s) with a host, got {url[:60]!r}")
        port = split.port or (443 if https else 80)
        addresses = (resolver or system_resolver)(split.hostname, port)
        refused = [a for a in addresses if not policy.allows(a)]
        if refused or not addresses:
            raise invalid(f"{where}: the image URL's host {split.hostname!r} is at "
                          f"{refused[0] if refused else 'no address'}, a loopback, link-local or private address: "
                          f"the gateway does not fetch images from there (add the network to image_fetch_allow in "
                          f"gateway.yaml to allow it)")
        status, headers, body = _get(split, https, addresses[0], port, deadline, policy.timeout, where)
        if status in (301, 302, 303, 307, 308) and headers.get("location"):
            url = urljoin(url, headers["location"])
            continue
        if status != 200:
            raise invalid(f"{where}: fetching the image URL answered HTTP {status}")
        return body
    raise invalid(f"{where}: the image URL redirected more than {MAX_REDIRECTS} times")


def _get(split, https: bool, address: str, port: int, deadline: float, timeout: float, where: str):
    remaining = max(0.1, deadline - time.monotonic())
    if https:
        conn = http.client.HTTPSConnection(split.hostname, port, timeout=remaining,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(split.hostname, port, timeout=remaining)
    # connect to the address that was checked; TLS still verifies the URL's host name
    conn._create_connection = lambda _, timeout, source=None: socket.create_connection(  # noqa: SLF001
        (address, port), timeout, source)
    path = split.path or "/"
    if split.query:
        path += "?" + split.query
    try:
        conn.request("GET", path, headers={"Accept": ", ".join(MEDIA_TYPES), "User-Agent": "mlxgate"})
        answer = conn.getresponse()
        headers = {k.lower(): v for k, v in answer.getheaders()}
        length = headers.get("content-length")
        if answer.status == 200 and length and length.isdigit() and int(length) > MAX_IMAGE_BYTES:
            raise _too_large(where, int(length))
        chunks, size = [], 0
        while answer.status == 200:
            if time.monotonic() > deadline:
                raise invalid(f"{where}: fetching the image URL took too long (the limit is {timeout:g} s)")
            chunk = answer.read(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_IMAGE_BYTES:
                raise _too_large(where, size)
            chunks.append(chunk)
        return answer.status, headers, b"".join(chunks)
    except (OSError, http.client.HTTPException) as exc:
        raise invalid(f"{where}: the image URL could not be fetched: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()


# ------------------------------------------------------------------ what the bytes are
def media_type_of(data: bytes, where: str = "image") -> str:
    """The media type an image's first bytes say; a 400 for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    raise invalid(f"{where}: the data is not an image: send {', '.join(MEDIA_TYPES)}")


def sniff(data: bytes, where: str = "image") -> tuple[str, int, int]:
    """(media type, width, height) from an image's first bytes; a 400 for anything else."""
    media_type = media_type_of(data, where)
    try:
        if media_type == "image/png" and data[12:16] == b"IHDR":
            return (media_type, *struct.unpack(">II", data[16:24]))
        if media_type == "image/gif":
            return (media_type, *struct.unpack("<HH", data[6:10]))
        if media_type == "image/webp":
            return (media_type, *_webp_size(data))
        if media_type == "image/jpeg":
            return (media_type, *_jpeg_size(data))
    except (struct.error, IndexError, ValueError):
        pass
    raise invalid(f"{where}: the image's header is damaged or cut short")


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        bits = struct.unpack("<I", data[21:25])[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    raise ValueError("unknown WebP chunk")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            raise ValueError("not a marker")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD9)):  # standalone markers
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        i += 2 + length
    raise ValueError("no frame header")
