"""Who may talk to a server on this machine: the Host and Origin rules `tunesmith serve` applies (and the UI's),
and the body limit both apply before a route reads a byte.

A web page whose name was re-pointed at 127.0.0.1 (DNS rebinding) still sends its own name as Host, and a page
on another site sends its own Origin: both are refused before any route runs, unless the user named them.
This module imports nothing heavy: the CLI's help reads it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

LOOPBACK = frozenset({"127.0.0.1", "localhost", "[::1]"})
ANY_HOST = "*"  # --allow-host '*': any Host, for a server behind a proxy that checks names itself


def host_name(host: str) -> str:
    """The name part of a Host header: 'localhost:8765' -> 'localhost', '[::1]:80' -> '[::1]'."""
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def as_host(address: str) -> str:
    """An address as a Host header names it: IPv6 in brackets ('::1' -> '[::1]'), any port dropped, lower case."""
    if ":" in address and not address.startswith("[") and address.count(":") > 1:
        return f"[{address}]".lower()
    return host_name(address).lower()


def allowed_hosts(bound: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The Host names a server bound to `bound` answers to: that address, this machine's loopback names, `extra`."""
    return LOOPBACK | {as_host(bound)} | {as_host(name) for name in extra}


def host_allowed(host: str, allowed: frozenset[str]) -> bool:
    return ANY_HOST in allowed or host_name(host).lower() in allowed


def origin_allowed(origin: str, host: str, allowed: frozenset[str]) -> bool:
    """A browser's Origin is this server's own page (same scheme-less name as the Host), or one the user named."""
    own = {f"http://{host}".lower(), f"https://{host}".lower()}
    return origin.lower() in own or as_origin(origin) in allowed


def as_origin(url: str) -> str:
    """An origin as browsers send it: 'http://app.example:3000/' -> 'http://app.example:3000'."""
    return url.strip().rstrip("/").lower()


# --- Request bodies: never read past a limit ----------------------------------------------------------------------

TOO_LARGE = object()  # read_body's answer for a body over the limit
GONE = object()  # read_body's answer when the client left before sending it all


async def read_body(scope: dict, receive: Callable[[], Awaitable[dict]], limit: int) -> bytes | object:
    """The whole request body, or TOO_LARGE as soon as it (declared or counted) is over `limit` bytes, or GONE.

    A declared Content-Length over the limit is refused before a byte is read; a chunked body declares none, so
    what arrives is counted and reading stops at the limit."""
    declared = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"content-length"), None)
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return TOO_LARGE
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return GONE
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return TOO_LARGE
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Callable[[], Awaitable[dict]]) -> Callable[[], Awaitable[dict]]:
    """An ASGI receive that gives `body` once (already read by read_body), then whatever the client sends next."""
    pending: dict | None = {"type": "http.request", "body": body, "more_body": False}

    async def receive_again() -> dict:
        nonlocal pending
        if pending is not None:
            message, pending = pending, None
            return message
        return await receive()

    return receive_again
