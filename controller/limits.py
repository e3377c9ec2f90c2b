"""Limits every request meets before a route runs: failed-auth rate, body size, strict JSON.

Plain ASGI middleware (no BaseHTTPMiddleware), so nothing buffers a body the limit refuses, and
one 422 shape for input the API cannot take, the same as FastAPI's validation errors.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

INT_DIGITS_MAX = 20
"""Longest integer literal a body may hold (2**64 has 20 digits); every integer field of the
API fits in 64 bits, and longer literals cost quadratic time to convert."""

_SURROGATE = re.compile("[\ud800-\udfff]")


async def _send_json(send: Send, status: int, body: Any, headers: dict[str, str]) -> None:
    raw = json.dumps(body, ensure_ascii=True).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


def _problem(msg: str) -> list[dict[str, Any]]:
    return [{"loc": ["body"], "msg": msg, "type": "value_error"}]


# --- body size -----------------------------------------------------------------------------


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a chunked body passes the limit; FastAPI re-raises
    HTTPExceptions met while reading a body, so it becomes the 413 answer."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"request body larger than {limit} bytes",
            headers={"Connection": "close"},
        )


class BodyLimit:
    """413 for a body over `max_bytes`: at once from Content-Length (the body is never read),
    else counted chunk by chunk as the app reads it."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = BodyTooLarge(self.max_bytes)
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length < 0 or length > self.max_bytes:
                    status = 413 if length > self.max_bytes else 400
                    msg = too_large.detail if status == 413 else "malformed Content-Length"
                    await _send_json(send, status, {"detail": msg}, {"connection": "close"})
                    return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if started:
                raise
            await _send_json(send, 413, {"detail": too_large.detail}, {"connection": "close"})


# --- strict JSON ---------------------------------------------------------------------------


class _Refused(ValueError):
    pass


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not a number JSON allows (no NaN or infinities)")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {text[:40]} is out of range (finite 64-bit floats only)")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > INT_DIGITS_MAX:
        raise _Refused(f"integer {text[:24]}... is out of range (at most {INT_DIGITS_MAX} digits)")
    return int(text)


def strict_json(raw: bytes) -> Any:
    """`raw` decoded as JSON; _Refused for what the API cannot take: NaN and infinities,
    floats that overflow (1e400), integers past 64 bits, strings with lone surrogates
    (not encodable as UTF-8), nesting deeper than Python's decoder goes."""
    try:
        doc = json.loads(raw, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except _Refused:
        raise
    except RecursionError:
        raise _Refused("JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise _Refused(f"JSON decode error: {e}") from None
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise _Refused("a string holds a lone surrogate (not encodable as UTF-8)")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return doc


def _is_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            mime = value.split(b";", 1)[0].strip().lower()
            return bool(mime == b"application/json" or mime.endswith(b"+json"))
    return False


class StrictJson:
    """422 for JSON bodies holding NaN, infinities, out-of-range numbers or lone surrogates,
    before any route parses them (Python's decoder accepts all of these, and they surfaced
    as 500s or reset connections). The body, read once here within BodyLimit's bound, is
    handed on unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        if raw:
            try:
                strict_json(raw)
            except _Refused as e:
                await _send_json(send, 422, {"detail": _problem(str(e))}, {})
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def json_safe(value: Any) -> Any:
    """`value` (jsonable) with non-finite floats and unencodable strings made printable, for
    echoing a client's input back in an error."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, str) and _SURROGATE.search(value):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 answer, but one that can always be encoded (its default echoes the
    input, and a NaN or a lone surrogate there made it a 500)."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": json_safe(jsonable_encoder(exc.errors()))}, status_code=422)


# --- failed authentication -----------------------------------------------------------------


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class AuthFailureLimit:
    """429 with Retry-After for API requests from a client address that caused too many 401s.

    A token bucket per address (`burst` deep, refilled at `per_s`) is drawn from only by 401
    answers, so valid clients never spend it. While an address's bucket is empty its /v1
    requests are refused before their token is checked, else guessing could go on behind the
    429s; /healthz, /metrics and the docs stay open. One exception keeps valid clients that
    share the address (a NAT, a proxy, a loopback harness) unslowed: a bearer token this
    address presented to an authenticating route within the last `clients` such successes
    still passes (the app then checks it as ever; a 401 drops it). A guess cannot be on that
    list unless it is a token in use there. At most `clients` addresses and `clients` trusted
    (address, token) pairs are kept, least recently seen dropped first (a dropped address
    starts with a full bucket, as a new one would); tokens are kept as keyed digests.
    """

    def __init__(
        self, app: ASGIApp, *, burst: int, per_s: float, clients: int, prefix: str = "/v1/"
    ) -> None:
        self.app = app
        self.burst = burst
        self.per_s = per_s
        self.clients = clients
        self.prefix = prefix
        self.buckets: collections.OrderedDict[str, _Bucket] = collections.OrderedDict()
        self.trusted: collections.OrderedDict[tuple[str, bytes], None] = collections.OrderedDict()
        self._key = secrets.token_bytes(16)
        self._authenticates: dict[int, bool] = {}

    def _level(self, client: str, now: float) -> _Bucket | None:
        b = self.buckets.get(client)
        if b is None:
            return None
        b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.per_s)
        b.at = now
        if b.tokens >= self.burst:
            del self.buckets[client]  # full again: as good as never seen
            return None
        self.buckets.move_to_end(client)
        return b

    def _failed(self, client: str, now: float) -> None:
        b = self._level(client, now)
        if b is None:
            b = self.buckets[client] = _Bucket(float(self.burst), now)
            while len(self.buckets) > self.clients:
                self.buckets.popitem(last=False)
        b.tokens = max(0.0, b.tokens - 1.0)

    def _digest(self, scope: Scope) -> bytes | None:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer" and token.strip():
                    return hashlib.blake2b(token.strip(), key=self._key, digest_size=16).digest()
        return None

    def _route_authenticates(self, route: object) -> bool:
        """Whether `route` resolves the caller's token (depends on `get_principal`): only then
        does an answer other than 401 prove the token valid."""
        known = self._authenticates.get(id(route))
        if known is None:
            from controller.deps import get_principal

            known = False
            stack = list(getattr(getattr(route, "dependant", None), "dependencies", ()))
            while stack and not known:
                d = stack.pop()
                known = d.call is get_principal
                stack.extend(d.dependencies)
            self._authenticates[id(route)] = known
        return known

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        peer = scope.get("client")
        client = peer[0] if peer else "unknown"
        digest = self._digest(scope)
        pair = (client, digest) if digest is not None else None
        b = self._level(client, time.monotonic())
        if b is not None and b.tokens < 1.0 and (pair is None or pair not in self.trusted):
            wait = math.ceil((1.0 - b.tokens) / self.per_s)
            await _send_json(
                send,
                429,
                {"detail": f"too many failed authentications from {client}; retry in {wait} s"},
                {"retry-after": str(wait)},
            )
            return

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] == 401:
                    self._failed(client, time.monotonic())
                    if pair is not None:
                        self.trusted.pop(pair, None)
                elif pair is not None and self._route_authenticates(scope.get("route")):
                    self.trusted[pair] = None
                    self.trusted.move_to_end(pair)
                    while len(self.trusted) > self.clients:
                        self.trusted.popitem(last=False)
            await send(message)

        await self.app(scope, receive, watched)
