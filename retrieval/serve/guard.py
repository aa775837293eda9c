"""RequestGuard, the ASGI middleware every HTTP request of `retrieval serve` passes: it counts requests in flight,
refuses bodies over the size limit (413) or too slow to arrive (408), and drops clients that hang up early."""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.requests import ClientDisconnect

from retrieval.serve.service import Service

logger = logging.getLogger("retrieval.serve")


class RequestGuard:
    """Every HTTP request passes here: counted while in flight (service.in_flight); its body refused with 413 past
    `max_body_bytes` (by Content-Length, or while streaming) and with 408 when it has not fully arrived
    `read_timeout` seconds after the request's head (the connection is closed: a client that stalls holds nothing
    for long); a client that hangs up before its body is read is dropped with a debug line, not reported as an
    error."""

    def __init__(self, app, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limits = self.service.limits
        limit = limits.max_body_bytes
        if _declared_over(scope, limit):
            return await _send_error(send, 413, f"request body over the limit of {limit:,} bytes")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.read_timeout
        seen = 0
        body_done = False
        started = False

        async def guarded_receive():
            nonlocal seen, body_done
            if body_done:  # after the body: only a disconnect can come, whenever it does
                return await receive()
            try:
                if _timeout_at is not None:  # Python 3.11+: no task per receive, as wait_for makes
                    async with _timeout_at(deadline):
                        message = await receive()
                else:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except (asyncio.TimeoutError, TimeoutError):
                raise _ReadTimeout() from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge()
                body_done = not message.get("more_body", False)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        self.service.in_flight += 1
        try:
            await self.app(scope, guarded_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_error(send, 413, f"request body over the limit of {limit:,} bytes")
        except _ReadTimeout:
            logger.debug("%s %s: the body did not arrive within %g s (408)", scope["method"], scope["path"],
                         limits.read_timeout)
            if not started:
                await _send_error(send, 408, f"the request body did not arrive within {limits.read_timeout:g} s")
        except ClientDisconnect:
            logger.debug("%s %s: the client left before its request was read", scope["method"], scope["path"])
        finally:
            self.service.in_flight -= 1


def _declared_over(scope, limit: int) -> bool:
    """Whether the request's Content-Length already says its body is over `limit` (an unreadable one: no)."""
    declared = dict(scope.get("headers") or []).get(b"content-length")
    if declared is None:
        return False
    try:
        return int(declared) > limit
    except ValueError:
        return False


_timeout_at = getattr(asyncio, "timeout_at", None)


class _TooLarge(Exception):
    pass


class _ReadTimeout(Exception):
    pass


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
