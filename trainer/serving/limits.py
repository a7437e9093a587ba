"""What the recommendation service (trainer/commands/serve.py) accepts from a caller.

- RequestGuard: ASGI middleware in front of the app. Requests to a protected path (POST /items) without the API key
  get 401; a body over the limit gets 413. Both are decided before the app reads the body: a Content-Length over the
  limit is refused at once, and a body sent without one (chunked) is counted as it arrives and refused at the first
  chunk past the limit.
- bounded(): error details are cut to a short prefix, so that no error echoes a caller's megabytes back.
- check_image_pixels(): an image's declared size, read from its header before it is decoded (a small JPEG can declare
  a picture that takes gigabytes to decode).

The items journal (items added over HTTP, kept across restarts) is serving/journal.py.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import json
import socket
import warnings

from PIL import Image
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024  # a base64 JPEG of about 6 MB, with margin
MIN_MAX_BODY_BYTES = 1024
MAX_DETAIL_CHARS = 900  # an error's "detail": a short prefix of anything a caller sent, never more
MAX_IMAGE_PIXELS = 40_000_000  # a posted image's width x height (e.g. 8000 x 5000): decoding takes 3 bytes a pixel
API_KEY_ENV = "TRANSREC_API_KEY"


def bounded(text: object, limit: int = MAX_DETAIL_CHARS) -> str:
    """`text` cut to at most `limit` characters, saying how long it was."""
    text = str(text)
    if len(text) <= limit:
        return text
    tail = f"... ({len(text)} characters)"
    return text[: limit - len(tail)] + tail


def check_image_pixels(data: bytes, limit: int = MAX_IMAGE_PIXELS) -> None:
    """ValueError when the image's header declares more than `limit` pixels; anything unreadable is left to the
    decoder, which names the problem."""
    what = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
        if width * height > limit:
            what = f"is {width} x {height} pixels"
    except Image.DecompressionBombError:  # Pillow's own limit, far above ours
        what = f"declares more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels"
    except Exception:  # noqa: BLE001 - not an image: the decoder's error names it
        return
    if what:
        raise ValueError(f"the image {what}, over the service's limit of {limit} pixels: send a smaller picture (the "
                         "model sees it scaled down anyway)")


def is_loopback(host: str) -> bool:
    """True when `host` (an address or a name) only reaches this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def key_problem(headers: Headers, api_key: str) -> str | None:
    """Why a request does not carry `api_key` (in `Authorization: Bearer <key>` or `X-API-Key: <key>`), or None.
    Keys are compared in constant time."""
    offered = []
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        offered.append(token.strip())
    if headers.get("x-api-key"):
        offered.append(headers["x-api-key"].strip())
    if not offered:
        return ("POST /items needs the service's API key: send it as 'Authorization: Bearer <key>' or "
                "'X-API-Key: <key>'")
    expected = api_key.encode("utf-8")
    ok = False
    for candidate in offered:  # header values arrive as latin-1: their bytes are the bytes sent
        ok |= hmac.compare_digest(candidate.encode("latin-1", "replace"), expected)
    return None if ok else ("the API key sent is not the service's key: send the key the service was started with "
                            f"(--api-key or {API_KEY_ENV})")


async def reply(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A JSON {"detail": ...} answer; the connection is closed after it (the request's body may be left unread)."""
    body = json.dumps({"detail": bounded(detail)}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """The API key of the protected paths (any method on a path starting with one of `protected`) and the body
    limit, checked before `app` reads any of the body."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, api_key: str | None = None,
                 protected: tuple[str, ...] = ("/items",)):
        self.app, self.max_body_bytes, self.api_key, self.protected = app, max_body_bytes, api_key, protected

    def too_large(self) -> str:
        return (f"the request body is larger than the service's limit of {self.max_body_bytes} bytes "
                "(--max-body-bytes): send a smaller body (an image: a smaller JPEG)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.api_key and scope["path"].startswith(self.protected):
            problem = key_problem(headers, self.api_key)
            if problem:
                await reply(send, 401, problem, [(b"www-authenticate", b'Bearer realm="transrec"')])
                return
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                await reply(send, 400, f"Content-Length {bounded(length, 40)!r} is not a number of bytes")
                return
            if int(length) > self.max_body_bytes:
                await reply(send, 413, self.too_large())
                return
        received, refused, started = 0, False, False

        async def counted() -> Message:  # a body without Content-Length (chunked): counted as it arrives
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    refused = True
                    if not started:
                        await reply(send, 413, self.too_large())
                    return {"type": "http.disconnect"}  # the app stops reading; its own answer is dropped
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, guarded_send)
