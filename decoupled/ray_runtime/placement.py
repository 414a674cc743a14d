"""Placing the stages again after a failure, away from a node that is gone.

When a node's machine is lost, the GCS marks it dead only after its health checks have failed
for a while (about 13 s with Ray's defaults). Until then it still counts the node's free
resources, so a new placement group may be given a bundle there, and waits on it (on a node
that hangs, for as long as the GCS takes to mark it dead; a refused connection the GCS gets over
by itself within a second or two). The restart knows better: a node whose raylet refuses a
connection or does not answer on it cannot host anything, so its
ID is excluded from every bundle through Ray's ``ray.io/node-id`` label (a label selector per
bundle, Ray >= 2.49). A node whose stage actor died while its raylet answers is kept: the
process was lost, not the machine, and its resources are still there.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

NODE_ID_LABEL = "ray.io/node-id"  # set by Ray on every node
PROBE_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Node:
    """What the GCS says of one node, as far as a restart needs it."""

    alive: bool
    address: str  # the raylet's host
    port: int  # the raylet's port


def lost_nodes(
    stage_nodes: Iterable[str],
    table: Mapping[str, Node],
    reachable: Callable[[str, int], bool],
) -> set[str]:
    """The nodes, of those that held a stage, that are gone: marked dead by the GCS, unknown
    to it, or with a raylet that ``reachable(address, port)`` cannot reach."""
    lost = set()
    for node_id in set(stage_nodes):
        node = table.get(node_id)
        if node is None or not node.alive or not reachable(node.address, node.port):
            lost.add(node_id)
    return lost


def bundle_selectors(num_bundles: int, excluded: Iterable[str]) -> list[dict[str, str]] | None:
    """Per-bundle label selectors that keep every bundle off the ``excluded`` nodes (None when
    there are none: Ray's default placement)."""
    ids = sorted(set(excluded))
    if not ids:
        return None
    return [{NODE_ID_LABEL: f"!in({','.join(ids)})"} for _ in range(num_bundles)]


# What an HTTP/2 client sends first: the connection preface and an empty SETTINGS frame. A gRPC
# server (a raylet) answers it with a SETTINGS frame of its own at once.
_HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def raylet_reachable(address: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a raylet answers within ``timeout_s``: a connection is refused at once on a
    machine whose processes are gone and unanswered on one that dropped off the network; on a
    machine that hangs (or whose processes are stopped) the kernel still accepts it, but
    nothing replies to the HTTP/2 preface. A reply of any kind, even a close, is an answer."""
    try:
        with socket.create_connection((address, port), timeout=timeout_s) as connection:
            connection.settimeout(timeout_s)
            connection.sendall(_HTTP2_HELLO)
            connection.recv(1)
            return True
    except OSError:  # refused, unreachable, reset, or silent (TimeoutError)
        return False


def node_table(nodes: list[dict[str, Any]]) -> dict[str, Node]:
    """``ray.nodes()`` as Node records by node ID."""
    return {
        n["NodeID"]: Node(bool(n["Alive"]), str(n["NodeManagerAddress"]), int(n["NodeManagerPort"]))
        for n in nodes
    }
