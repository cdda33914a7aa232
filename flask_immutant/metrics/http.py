"""The node's metrics path: who may read it, and the WSGI layer that answers it.

The path is answered before the app's own routes, on the node's HTTP port (by the app runtime
serving the root context; ``/-/`` is a prefix no Flask app is expected to route). The embedded
balancer answers it itself and never forwards anything under :data:`RESERVED_PREFIX` (nor does
the HAProxy configuration we generate), so a node never takes the balancer's loopback address for
the client's; and a node refuses the path to a request forwarded by a proxy it does not trust.
Only loopback and ``IMMUTANT_METRICS_ALLOW`` may read it. A request through a proxy listed in
``IMMUTANT_TRUSTED_PROXIES`` is judged by the client address the proxy reports, not the proxy's.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("flask_immutant.metrics")

#: Paths flask-immutant answers itself on a node's port. Our balancers never forward them (a
#: node would take the balancer's address for the client's): :func:`reserved` in the embedded
#: balancer, :data:`HAPROXY_DENY` in the generated HAProxy configuration. docs/security.md.
RESERVED_PREFIX = "/-/immutant/"
#: Where a node serves its metrics.
METRICS_PATH = RESERVED_PREFIX + "metrics"
#: The one rule, on a path percent-decoded twice and lower-cased: the reserved prefix, also when
#: spelt with repeated slashes, ``.``/``..`` segments or backslashes, anywhere in the path.
RESERVED_PATTERN = r"(^|[/\\])-[/\\]+((\.|\.\.)[/\\]+)*immutant([/\\]|$)"
#: The same rule as an HAProxy ``http-request`` line.
HAPROXY_DENY = f"http-request deny deny_status 404 if {{ path,url_dec,url_dec,lower -m reg '{RESERVED_PATTERN}' }}"
#: Request headers a proxy adds; a node refuses the metrics path to a request carrying any of
#: them from a peer not in IMMUTANT_TRUSTED_PROXIES (:func:`forwarded_by_untrusted`).
FORWARDED_BY_UNTRUSTED = "flask_immutant.forwarded_by_untrusted"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Any]
LOOPBACK: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def reserved(raw_path: str) -> bool:
    """Whether a request target (raw, as the client sent it) falls under :data:`RESERVED_PREFIX`
    by :data:`RESERVED_PATTERN`: what the embedded balancer refuses to forward."""
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    if "%" not in path and "immutant" not in path.lower():
        return False  # nothing to decode, and the pattern needs the word: the balancer's usual case
    decoded = urllib.parse.unquote(urllib.parse.unquote(path, errors="replace"), errors="replace")
    return re.search(RESERVED_PATTERN, decoded.lower()) is not None


def forwarding(header: str) -> bool:
    """Whether ``header`` (``X-Forwarded-For``, or WSGI's ``HTTP_X_FORWARDED_FOR``) is one a proxy adds."""
    name = header.lower().replace("_", "-").removeprefix("http-")
    return name == "forwarded" or name.startswith("x-forwarded-")


def forwarded(environ: dict[str, Any]) -> bool:
    """Whether a WSGI request carries a header a proxy adds (``X-Forwarded-*``, ``Forwarded``)."""
    return any(forwarding(key) for key in environ if key.startswith("HTTP_"))


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
        if environ.get(FORWARDED_BY_UNTRUSTED):
            return _plain(start_response, "403 Forbidden", f"metrics are not served through a proxy that is not in "
                          f"IMMUTANT_TRUSTED_PROXIES ({peer or '?'} sent X-Forwarded-* headers)\n")
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
