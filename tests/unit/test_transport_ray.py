"""The Ray data plane's wire form and ordering, without Ray: pickle 5 is what Ray uses."""

from __future__ import annotations

import pickle
import threading

import pytest
import torch

from decoupled.channel import BackwardMessage, ForwardMessage, Kind, Policy
from decoupled.ray_runtime.transport_ray import OrderedInbox, WireMessage

TENSORS = [
    torch.randn(4, 6),
    torch.randn(6, 4).t(),  # non-contiguous
    torch.randn(2, 3, 5).to(torch.bfloat16),
    torch.zeros(0, 5),
    torch.tensor([True, False, True]),
    torch.tensor(3.5, dtype=torch.float64),  # 0-dim
]


def _round_trip(wire: WireMessage) -> tuple[WireMessage, int]:
    """Through pickle 5 as Ray does it; also how many buffers went out of band."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(wire, protocol=5, buffer_callback=buffers.append)
    return pickle.loads(data, buffers=buffers), len(buffers)


@pytest.mark.parametrize("tensor", TENSORS, ids=lambda t: f"{t.dtype}{tuple(t.shape)}")
def test_forward_messages_cross_pickle_with_their_bytes_out_of_band(tensor: torch.Tensor) -> None:
    labels = torch.arange(tensor.shape[0] if tensor.dim() else 1)
    wire, out_of_band = _round_trip(WireMessage.pack(ForwardMessage(7, Kind.EVAL, tensor, labels)))
    message = wire.unpack()
    assert isinstance(message, ForwardMessage)
    assert (message.seq, message.kind) == (7, Kind.EVAL)
    assert message.activations.dtype == tensor.dtype
    assert torch.equal(message.activations, tensor)
    assert torch.equal(message.labels, labels)
    assert out_of_band == 2  # activations and labels: never copied into the pickle stream
    message.labels += 1  # a private copy: writable


def test_backward_messages_keep_their_target() -> None:
    target = torch.randn(5, 3)
    wire, _ = _round_trip(WireMessage.pack(BackwardMessage(11, target)))
    message = wire.unpack()
    assert isinstance(message, BackwardMessage)
    assert message.seq == 11 and torch.equal(message.target, target)


def test_inbox_releases_deliveries_in_their_numbered_order() -> None:
    inbox = OrderedInbox(capacity=8, policy=Policy.BLOCK)
    wires = [WireMessage.pack(BackwardMessage(n, torch.full((2,), float(n)))) for n in range(5)]
    threads = [
        threading.Thread(target=inbox.deliver, args=(n, wires[n], 10.0)) for n in (3, 1, 4, 0, 2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    received = [inbox.channel.recv(timeout=1.0) for _ in range(5)]
    assert [m.seq for m in received if m is not None] == [0, 1, 2, 3, 4]
