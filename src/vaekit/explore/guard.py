"""The explorer's guard: plain ASGI in front of the app, checking every request first.

It answers only requests whose Host header names localhost, an IP address or a name given with
--allow-host (a page cannot reach the explorer by pointing its own domain at 127.0.0.1: DNS
rebinding), refuses requests that pages of other sites send (the Origin header), limits request
bodies before they are read and the requests answered at once, and adds the security headers to
every response.
"""

import ipaddress

from fastapi import HTTPException
from fastapi.responses import JSONResponse

MAX_IN_FLIGHT = 64  # requests answered at once (each holds a worker thread while decoding)
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; "
     b"style-src 'self'; script-src 'self'; connect-src 'self'; object-src 'none'; "
     b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


# ------------------------------------------------------------------------------------------------
# Host check and size limit: plain ASGI, in front of everything else


def host_of(header: str) -> str | None:
    """The host in a Host header ('name:port', '[v6]:port'), lower-case; None if malformed."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[1:end], value[end + 1:]
        if end < 0 or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return None
        return host
    host, colon, port = value.partition(":")
    if colon and not port.isdigit():
        return None
    return host.rstrip(".") or None


def host_allowed(host: str | None, names: frozenset[str]) -> bool:
    """localhost, an IP address, or a name the user allowed.

    An IP address is safe: DNS rebinding needs a name the attacker controls, and a page whose
    origin is this very address and port can only be this server's own page.
    """
    if host is None:
        return False
    if host in names:
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def same_origin(origin: str, host: str) -> bool:
    """Whether a browser's Origin header ('http://name:port') names the server of this Host."""
    scheme, separator, address = origin.strip().lower().partition("://")
    if not separator or scheme != "http":
        return False
    host = host.strip().lower()
    return address == host or address == host.removesuffix(":80") or \
        f"{address}:80" == host


class Guard:
    """Rejects foreign Host headers (400), requests a page of another site sends (403) and
    bodies over max_body bytes (413); adds security headers to every response."""

    def __init__(self, app, allowed_hosts: frozenset[str], max_body: int):
        self.app, self.allowed_hosts, self.max_body = app, allowed_hosts, max_body
        self.in_flight = 0  # requests being answered (idle connections do not count)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {}
        for key, value in scope.get("headers", []):
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        host = headers.get("host")
        if not host_allowed(host_of(host or ""), self.allowed_hosts):
            return await refuse(scope, receive, send, 400, (
                f"Host header {host!r} is not accepted: the explorer answers requests addressed "
                "to localhost, an IP address, or a name given with --allow-host"))
        origin = headers.get("origin")
        if origin is not None and not same_origin(origin, host):
            # Browsers name the page's site in Origin; only the explorer's own page may call it,
            # so a site the user visits cannot make it decode (and burn CPU) on its behalf.
            return await refuse(scope, receive, send, 403, (
                f"requests from {origin!r} are refused: only the explorer's own page may call "
                "its API"))
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await refuse(scope, receive, send, 413, (
                f"request body of {length} bytes is over the explorer's limit of "
                f"{self.max_body} bytes; upload a smaller image"))
        if self.in_flight >= MAX_IN_FLIGHT:
            return await refuse(scope, receive, send, 503, (
                f"the explorer is answering {self.in_flight} requests already; retry in a "
                "moment"))
        received = 0
        limit = self.max_body

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # a chunked body that did not say its length
                    raise HTTPException(413, f"request body is over the explorer's limit of "
                                             f"{limit} bytes; upload a smaller image")
            return message

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  *SECURITY_HEADERS]}
            await send(message)

        self.in_flight += 1
        try:
            await self.app(scope, counted_receive, send_with_headers)
        finally:
            self.in_flight -= 1


async def refuse(scope, receive, send, status: int, detail: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    response = JSONResponse({"detail": detail}, status_code=status,
                            headers={"connection": "close"})
    await response(scope, receive, send)
