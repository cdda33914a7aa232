"""Who a node is: its name, ports and data dir, derived from settings.

Defaults make the walkthrough need no options: the name is the host name plus the port offset,
so two nodes on one machine differ, and each has its own data dir under ``IMMUTANT_HOME/nodes``.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Addresses that mean "every interface": a node bound to one must be told what to advertise.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def default_node_name(port_offset: int) -> str:
    short = socket.gethostname().split(".")[0]
    short = re.sub(r"[^A-Za-z0-9_.-]", "-", short).strip("-._")[:50] or "node"  # a names.name()
    return short if port_offset == 0 else f"{short}-{port_offset}"


def node_name(settings: Mapping[str, Any]) -> str:
    """The node's name: ``IMMUTANT_NODE_NAME`` (the node passes its own to its runtimes), else
    the default. The one place a node name comes from."""
    return settings["IMMUTANT_NODE_NAME"] or default_node_name(settings["IMMUTANT_PORT_OFFSET"])


@dataclass(frozen=True)
class NodeIdentity:
    name: str
    host: str
    port_offset: int
    ports: Mapping[str, int]
    data_dir: Path
    clustered: bool
    #: What other nodes and balancers connect to (IMMUTANT_ADVERTISE_HOST, else the bind address).
    address: str = field(default="")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> NodeIdentity:
        offset = settings["IMMUTANT_PORT_OFFSET"]
        name = node_name(settings)
        host = settings["IMMUTANT_HOST"]
        # Outside a node (which refuses a wildcard bind with nothing to advertise) the host name
        # is the best guess.
        address = settings.get("IMMUTANT_ADVERTISE_HOST") or (socket.gethostname() if host in WILDCARD_HOSTS
                                                               else host)
        return cls(
            name=name,
            host=host,
            port_offset=offset,
            ports={"http": settings["IMMUTANT_HTTP_PORT"] + offset},
            data_dir=Path(settings["IMMUTANT_HOME"]) / "nodes" / name,
            clustered=settings["IMMUTANT_CLUSTERED"],
            address=address,
        )

    @property
    def http_port(self) -> int:
        return self.ports["http"]
