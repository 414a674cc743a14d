"""Placement after a failure: which nodes are gone, and the selectors that keep stages off them."""

from __future__ import annotations

import socket
import threading
import time

from ray._private.label_utils import validate_label_selector

from decoupled.ray_runtime.placement import (
    NODE_ID_LABEL,
    Node,
    bundle_selectors,
    lost_nodes,
    node_table,
    raylet_reachable,
)

TABLE = {
    "a": Node(alive=True, address="10.0.0.1", port=1),
    "b": Node(alive=True, address="10.0.0.2", port=2),
    "c": Node(alive=False, address="10.0.0.3", port=3),
}


def test_a_node_is_lost_when_dead_unknown_or_its_raylet_does_not_answer() -> None:
    answers = {"10.0.0.1": True, "10.0.0.2": False, "10.0.0.3": True}
    probed: list[str] = []

    def reachable(address: str, port: int) -> bool:
        probed.append(address)
        return answers[address]

    assert lost_nodes(["a", "b", "c", "d", "a"], TABLE, reachable) == {"b", "c", "d"}
    assert sorted(probed) == ["10.0.0.1", "10.0.0.2"]  # the GCS's verdict needs no probe


def test_a_stage_process_that_died_on_a_live_node_keeps_the_node() -> None:
    assert lost_nodes(["a", "b"], TABLE, lambda address, port: True) == set()


def test_selectors_exclude_every_lost_node_from_every_bundle() -> None:
    assert bundle_selectors(3, []) is None
    selectors = bundle_selectors(3, {"c", "b"})
    assert selectors == [{NODE_ID_LABEL: "!in(b,c)"}] * 3
    for selector in selectors:
        assert validate_label_selector(selector) is None  # Ray's own check: no complaint


def test_raylet_probe_needs_an_answer_not_only_a_connection() -> None:
    """A server that replies (as a raylet's gRPC server does) answers; a listener that never
    reads, as a stopped process behind the kernel's accept queue, does not; a closed port is
    refused."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def answer() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(64)
                connection.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")

        server = threading.Thread(target=answer)
        server.start()
        assert raylet_reachable("127.0.0.1", port, timeout_s=5)
        server.join(timeout=5)
        # Nobody accepts any more: the kernel still completes the connection, silence follows.
        start = time.monotonic()
        assert not raylet_reachable("127.0.0.1", port, timeout_s=0.3)
        assert time.monotonic() - start < 2
    assert not raylet_reachable("127.0.0.1", port)  # closed now: refused at once


def test_node_table_reads_ray_nodes() -> None:
    nodes = [
        {"NodeID": "a", "Alive": True, "NodeManagerAddress": "10.0.0.1", "NodeManagerPort": 1},
        {"NodeID": "c", "Alive": False, "NodeManagerAddress": "10.0.0.3", "NodeManagerPort": 3},
    ]
    assert node_table(nodes) == {"a": TABLE["a"], "c": TABLE["c"]}
