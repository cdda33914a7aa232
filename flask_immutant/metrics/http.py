"""The node's metrics path: who may read it, and the WSGI layer that answers it.

The path is answered before the app's own routes, on the node's HTTP port (by the app runtime
serving the root context; ``/-/`` is a prefix no Flask app is expected to route). The embedded
balancer answers it itself and never forwards it, so a node never takes the balancer's loopback
address for the client's.
Only loopback and ``IMMUTANT_METRICS_ALLOW`` may read it. A request through a proxy listed in
``IMMUTANT_TRUSTED_PROXIES`` is judged by the client address the proxy reports, not the proxy's.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("flask_immutant.metrics")

#: Where a node serves its metrics.
METRICS_PATH = "/-/immutant/metrics"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Any]
LOOPBACK: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def allowed(peer: str, allow: Iterable[Network]) -> bool:
    """Whether ``peer`` (an address as WSGI's ``REMOTE_ADDR`` has it) may read the metrics."""
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0].strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in (*LOOPBACK, *allow) if address.version == network.version)


def refusal(peer: str) -> str:
    """What a peer that may not read the metrics is told."""
    return f"metrics are served to loopback and IMMUTANT_METRICS_ALLOW only, not to {peer or '?'}"


def serving_metrics(app: WSGIApp, allow: Iterable[Network], render: Callable[[], tuple[bytes, str]]) -> WSGIApp:
    """``app``, with :data:`METRICS_PATH` answered by ``render`` for allowed peers (403 otherwise)."""
    networks = tuple(allow)

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") != METRICS_PATH or environ.get("SCRIPT_NAME"):
            return app(environ, start_response)
        peer = str(environ.get("REMOTE_ADDR") or "")
        if not allowed(peer, networks):
            return _plain(start_response, "403 Forbidden", refusal(peer) + "\n")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _plain(start_response, "405 Method Not Allowed", "GET the metrics\n", [("Allow", "GET, HEAD")])
        try:
            body, content_type = render()
        except Exception as exc:
            log.exception("metrics: the scrape failed")
            return _plain(start_response, "500 Internal Server Error", f"metrics unavailable: {exc}\n")
        start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body))),
                                  ("Cache-Control", "no-store")])
        return [b"" if environ["REQUEST_METHOD"] == "HEAD" else body]

    return wsgi


def _plain(start_response: Callable[..., Any], status: str, text: str,
           headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                            *(headers or [])])
    return [body]
