"""The limits an app runtime's HTTP server (waitress) holds clients to, and whose proxy headers
it believes. The figures are settings (``IMMUTANT_HTTP_*``, ``IMMUTANT_TRUSTED_PROXIES``);
docs/security.md says why each one is what it is.

waitress reads a request's head and body in its event loop and hands a thread only a complete
request, so slow clients cost connections, never threads: the connection limit is set far above
waitress's 100, polled with ``poll()`` (``select()`` stops at descriptor 1024), and every
connection is held to an idle timeout and to a deadline for sending a whole request.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..metrics.http import FORWARDED_BY_UNTRUSTED, forwarded

log = logging.getLogger("flask_immutant.server")

#: The proxy headers the embedded balancer (and HAProxy's ``option forwardfor``) set; each one
#: appends its own value, so the last one is the trusted proxy's.
TRUSTED_PROXY_HEADERS = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})

#: Descriptors kept for everything but client connections (store, broker, files, pipes).
DESCRIPTOR_HEADROOM = 256

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Any]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def waitress_limits(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``create_server`` keyword arguments for the ``IMMUTANT_HTTP_*`` limits."""
    idle = max(1, math.ceil(settings["IMMUTANT_HTTP_IDLE_TIMEOUT"]))
    return {
        "connection_limit": settings["IMMUTANT_HTTP_CONNECTION_LIMIT"],
        "channel_timeout": idle,
        "cleanup_interval": max(1, min(30, idle // 2)),  # how often idle connections are looked for
        "max_request_body_size": settings["IMMUTANT_HTTP_MAX_BODY"],
        "asyncore_use_poll": True,
        "clear_untrusted_proxy_headers": False,  # with_trusted_proxies decides, per peer
    }


def raise_descriptor_limit(connections: int) -> None:
    """Let this process hold ``connections`` sockets and its own files: raise the soft descriptor
    limit toward the hard one (many systems start processes at 1024)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + DESCRIPTOR_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open file limit from %d to %d: %s", soft, new, exc)


def with_read_deadline(channel_class: type, read_timeout: float) -> type:
    """A waitress channel that closes a connection whose request is still arriving
    ``read_timeout`` seconds after its first byte (a drip-fed head or body; a silent one is
    closed by the idle timeout). Blank lines outside a request (which HTTP lets a client send
    before one) are not activity: waitress counted them, so a client sending a few every while
    held its connection past the idle timeout (and a draining runtime's grace) for ever."""

    class ReadDeadlineChannel(channel_class):  # type: ignore[misc]  # a base chosen at run time is Any to mypy
        reading_since = 0.0
        blank_only = False  # what the last read brought was blank lines, and no request began
        last_activity: float  # waitress's: the wall-clock time of the last bytes read or sent

        def handle_read(self) -> None:
            idle_since = self.last_activity  # waitress stamps any bytes read as activity
            super().handle_read()
            if self.blank_only:
                self.last_activity = idle_since
                self.blank_only = False

        def received(self, data: bytes) -> bool:
            now = time.monotonic()
            if data and self.request is None:
                if not data.strip(b"\r\n"):
                    handled = bool(super().received(data))
                    self.blank_only = self.request is None and not self.requests
                    return handled
                self.reading_since = now  # the first byte of a request
            elif data and now - self.reading_since > read_timeout:
                log.info("closing a connection from %s: its request took over %gs to arrive",
                         self.addr[0] if self.addr else "?", read_timeout)
                self.will_close = True
                return False
            return bool(super().received(data))

    return ReadDeadlineChannel


def with_trusted_proxies(app: WSGIApp, proxies: Iterable[Network]) -> WSGIApp:
    """``app`` behind waitress's proxy-header middleware: the ``X-Forwarded-*`` headers of a
    request from one of ``proxies`` set the client's address, scheme and host (the last value,
    the one that proxy added); from anyone else they are removed before the app sees them, and
    the request is marked (:data:`~..metrics.http.FORWARDED_BY_UNTRUSTED`) so the metrics path
    refuses it: a proxy on loopback that nobody listed must not lend its address to its clients."""
    from waitress.proxy_headers import proxy_headers_middleware

    trusted = tuple(proxies)
    believing = proxy_headers_middleware(app, trusted_proxy="*", trusted_proxy_count=1,
                                         trusted_proxy_headers=set(TRUSTED_PROXY_HEADERS), clear_untrusted=True,
                                         logger=log)
    doubting = proxy_headers_middleware(app, trusted_proxy=None, clear_untrusted=True, logger=log)

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if _is_trusted(environ.get("REMOTE_ADDR", ""), trusted):
            return believing(environ, start_response)
        if forwarded(environ):  # noted before they are removed: the metrics path refuses such a request
            environ[FORWARDED_BY_UNTRUSTED] = True
        return doubting(environ, start_response)

    return wsgi


def _is_trusted(peer: str, trusted: tuple[Network, ...]) -> bool:
    if not trusted:
        return False
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in trusted)
