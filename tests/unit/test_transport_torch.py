"""The torch.distributed data plane over real gloo groups: 2 or 3 spawned processes, no Ray.

Each multi-process test runs one function per rank in a spawned child; the child checks what it
received with plain asserts and returns a small dict of plain values (or a traceback) through a
multiprocessing queue, and the parent asserts on those. Every wait is bounded.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

import pytest
import torch
import torch.distributed as dist

from decoupled.channel import (
    BackwardMessage,
    ChannelClosed,
    ForwardMessage,
    Kind,
    Message,
    Policy,
)
from decoupled.ray_runtime import transport_torch as tt

CPU = torch.device("cpu")
WAIT_S = 20.0  # the longest any single wait inside a child may take
Result = dict[str, Any]


# --- harness -------------------------------------------------------------------------------------


def _child(
    target: Callable[..., Result],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    results: Queue[tuple[int, str, Any]],
    args: tuple[Any, ...],
) -> None:
    torch.set_num_threads(1)  # 2 or 3 ranks share 2 cores
    try:
        tt.open_process_group(rank, world_size, "127.0.0.1", port, backend, timeout_s=WAIT_S)
        try:
            result = target(rank, *args, backend)
            if result.pop("skip_barrier", False):
                # A peer died: tearing down may wait on its NCCL ops, so report first.
                results.put((rank, "ok", result))
                return
            # Nobody tears down its sockets while a peer may still read its last message.
            dist.barrier()
        finally:
            tt.close_process_group()
        results.put((rank, "ok", result))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(
    target: Callable[..., Result],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 45.0,
    crashes: dict[int, int] | None = None,
) -> list[Result]:
    """Run ``target(rank, *args, backend)`` in ``world_size`` spawned processes sharing one
    group.

    ``crashes``: ranks expected to die on purpose, with their exit code; their result is
    ``{"exitcode": code}``.
    """
    crashes = crashes or {}
    ctx = mp.get_context("spawn")
    results: Queue[tuple[int, str, Any]] = ctx.Queue()
    port = tt.free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(target, rank, world_size, port, backend, results, args),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    collected: dict[int, Result] = {}
    deadline = time.monotonic() + timeout_s
    finished = False
    try:
        while len(collected) < world_size:
            if time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - set(collected))
                pytest.fail(f"ranks {missing} did not finish within {timeout_s}s")
            try:
                rank, status, value = results.get(timeout=0.2)
            except queue.Empty:
                for rank, proc in enumerate(procs):
                    if rank in crashes and rank not in collected and proc.exitcode == crashes[rank]:
                        collected[rank] = {"exitcode": proc.exitcode}
                crashed = [
                    rank
                    for rank, proc in enumerate(procs)
                    if rank not in collected and proc.exitcode not in (None, 0)
                ]
                if crashed:
                    pytest.fail(f"ranks {crashed} died without a result")
                continue
            if status != "ok":
                pytest.fail(f"rank {rank} failed:\n{value}")
            collected[rank] = value
        finished = True
    finally:
        for proc in procs:
            if finished:  # after a failure the others may sit in a barrier: no point waiting
                proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    return [collected[rank] for rank in range(world_size)]


def _device(rank: int, backend: str) -> torch.device:
    """Where a rank's tensors travel from: the host over gloo, GPU ``rank`` over NCCL."""
    if backend == "gloo":
        return CPU
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    return device


def _nccl(ranks: int) -> Any:
    """The "nccl" parameter of a backend-parametrised test: a GPU test, one GPU per rank."""
    return pytest.param(
        "nccl",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                torch.cuda.device_count() < ranks, reason=f"NCCL needs one GPU per rank ({ranks})"
            ),
        ],
    )


def _wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _tensor(seq: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A ``shape`` tensor determined by ``seq``: each rank can rebuild what the other sent."""
    generator = torch.Generator().manual_seed(1000 + seq)
    return torch.randn(shape, generator=generator).to(dtype)


def _labels(seq: int, batch: int) -> torch.Tensor:
    """(batch,) int64 class indices for ``seq``."""
    generator = torch.Generator().manual_seed(2000 + seq)
    return torch.randint(0, 10, (batch,), generator=generator)


def _forward(seq: int, shape: tuple[int, ...], kind: Kind = Kind.TRAIN) -> ForwardMessage:
    return ForwardMessage(seq, kind, _tensor(seq, shape), _labels(seq, shape[0]))


def _stream(receiver: tt.TorchReceiver) -> Iterator[Message]:
    """Messages as they arrive, up to end-of-stream; fails if the stream stalls for WAIT_S."""
    count = 0
    while True:
        try:
            message = receiver.recv(timeout=WAIT_S)
        except ChannelClosed:
            return
        assert message is not None, f"stalled after {count} messages"
        count += 1
        yield message


def _drain(receiver: tt.TorchReceiver) -> list[Message]:
    return list(_stream(receiver))


# --- in-process: the header -------------------------------------------------------------------


def test_header_round_trip_and_rejects() -> None:
    forward = ForwardMessage(
        7, Kind.EVAL, torch.zeros(3, 2, 5, dtype=torch.bfloat16), _labels(0, 3)
    )
    header = tt.decode_header(tt.encode_header(forward))
    assert header.wire_type is tt.WireType.FORWARD
    assert (header.kind, header.seq, header.dtype, header.shape) == (
        Kind.EVAL,
        7,
        torch.bfloat16,
        (3, 2, 5),
    )
    assert header.labels == (torch.int64, (3,))

    backward = tt.decode_header(tt.encode_header(BackwardMessage(2**40, torch.zeros(0, 4))))
    assert (backward.wire_type, backward.seq, backward.shape, backward.labels) == (
        tt.WireType.BACKWARD,
        2**40,
        (0, 4),
        None,
    )
    assert tt.decode_header(tt.encode_header(None)).wire_type is tt.WireType.END
    assert len(tt.encode_header(forward)) == tt.HEADER_LEN

    with pytest.raises(tt.ProtocolError):
        tt.decode_header([0] * tt.HEADER_LEN)  # payload bytes read as a header
    with pytest.raises(TypeError):
        tt.encode_header(BackwardMessage(0, torch.zeros(2, dtype=torch.complex64)))
    with pytest.raises(ValueError):
        tt.encode_header(BackwardMessage(0, torch.zeros((1,) * (tt.MAX_NDIM + 1))))


def test_free_port_is_bindable() -> None:
    port = tt.free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


# --- two processes ----------------------------------------------------------------------------

# (seq, kind, shape, dtype): an eval batch of another size, a non-contiguous tensor (seq 4),
# an empty batch (only its header travels), then STOP.
_FORWARD_SPECS: list[tuple[int, Kind, tuple[int, ...], torch.dtype]] = [
    (0, Kind.TRAIN, (8, 5), torch.float32),
    (1, Kind.TRAIN, (8, 3, 4), torch.float16),
    (2, Kind.EVAL, (3, 5), torch.bfloat16),
    (3, Kind.TRAIN, (8, 5), torch.float64),
    (4, Kind.TRAIN, (8, 6), torch.float32),
    (5, Kind.EVAL, (0, 5), torch.float32),
    # More labels than the header carries: they travel as a tensor of their own.
    (6, Kind.TRAIN, (tt.INLINE_LABELS + 1, 2), torch.float32),
    (7, Kind.STOP, (1, 5), torch.float32),
]


def _forward_spec_message(
    seq: int, kind: Kind, shape: tuple[int, ...], dtype: torch.dtype
) -> ForwardMessage:
    activations = _tensor(seq, shape, dtype)
    if seq == 4:  # same values, but a transposed (non-contiguous) view of a (6, 8) tensor
        activations = activations.t().contiguous().t()
        assert not activations.is_contiguous()
    return ForwardMessage(seq, kind, activations, _labels(seq, shape[0]))


def _forward_shapes_rank(rank: int, backend: str) -> Result:
    dev = _device(rank, backend)
    if rank == 0:
        sender = tt.TorchSender(1, "forward", dev)
        with pytest.raises(TypeError):
            sender.send(BackwardMessage(0, torch.zeros(1)))
        with pytest.raises(ValueError):  # the other kind of tensor for this group's backend
            tt.TorchSender(1, "forward", CPU if backend == "nccl" else torch.device("cuda"))
        for spec in _FORWARD_SPECS:
            sender.send(_forward_spec_message(*spec), timeout=WAIT_S)
        closed = sender.close(timeout=WAIT_S)
        with pytest.raises(ChannelClosed):
            sender.send(_forward(99, (1, 1)))
        return {"closed": closed, "sent": sender.sent}

    # Room for every message and the end-of-stream: nothing is consumed until it all arrived.
    receiver = tt.TorchReceiver(0, "forward", len(_FORWARD_SPECS) + 1, Policy.BLOCK, dev)
    with pytest.raises(RuntimeError, match="already has a receiver"):
        tt.TorchReceiver(0, "forward", 1, Policy.BLOCK, dev)
    _wait_until(lambda: receiver.ended, "end-of-stream")
    depth = receiver.depth()
    messages = _drain(receiver)
    with pytest.raises(ChannelClosed):
        receiver.recv(timeout=0.0)
    for message, (seq, kind, shape, dtype) in zip(messages, _FORWARD_SPECS, strict=True):
        assert isinstance(message, ForwardMessage)
        assert (message.seq, message.kind) == (seq, kind)
        assert message.activations.dtype == dtype
        assert message.activations.shape == shape
        assert torch.equal(message.activations.cpu(), _tensor(seq, shape, dtype))
        assert message.labels.dtype == torch.int64
        assert torch.equal(message.labels.cpu(), _labels(seq, shape[0]))
        # Labels that travelled in the header stay on the host (no sync to read them).
        inline = 0 < shape[0] <= tt.INLINE_LABELS
        assert message.labels.device == (CPU if inline else dev)
        assert message.activations.device == dev
    receiver.close()
    return {
        "depth_at_end": depth,
        "seqs": [m.seq for m in messages],
        "last_kind": int(messages[-1].kind) if isinstance(messages[-1], ForwardMessage) else -1,
        "error": repr(receiver.error),
    }


@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend", ["gloo", _nccl(2)])
def test_forward_messages_of_many_shapes_arrive_in_order_then_end_of_stream(backend: str) -> None:
    producer, consumer = run_ranks(_forward_shapes_rank, 2, backend=backend, timeout_s=120)
    assert producer == {"closed": True, "sent": len(_FORWARD_SPECS)}
    assert consumer == {
        "depth_at_end": len(_FORWARD_SPECS),
        "seqs": [spec[0] for spec in _FORWARD_SPECS],
        "last_kind": int(Kind.STOP),
        "error": "None",
    }


def _drop_oldest_rank(rank: int, capacity: int, count: int, backend: str) -> Result:
    shape = (4, 6)
    if rank == 1:  # the later stage produces targets
        sender = tt.TorchSender(0, "backward", CPU)
        for seq in range(count):
            sender.send(BackwardMessage(seq, _tensor(seq, shape)), timeout=WAIT_S)
        return {"closed": sender.close(timeout=WAIT_S)}

    # A receiver closed without end-of-stream: its thread stays in a recv nothing can cancel,
    # so the edge refuses a second receiver that would race it for messages.
    stray = tt.TorchReceiver(1, "forward", 1, Policy.BLOCK, CPU)  # rank 1 never sends this way
    _wait_until(lambda: stray._on_wire, "the stray receiver to post its recv")
    stray.close()
    with pytest.raises(ChannelClosed):
        stray.recv(timeout=0.0)
    with pytest.raises(RuntimeError, match="already has a receiver"):
        tt.TorchReceiver(1, "forward", 1, Policy.BLOCK, CPU)

    receiver = tt.TorchReceiver(1, "backward", capacity, Policy.DROP_OLDEST, CPU)
    _wait_until(lambda: receiver.ended, "end-of-stream")  # not consuming while targets arrive
    depth, dropped = receiver.depth(), receiver.dropped
    messages = _drain(receiver)
    for message in messages:
        assert isinstance(message, BackwardMessage)
        assert torch.equal(message.target, _tensor(message.seq, shape))
    return {"depth": depth, "dropped": dropped, "seqs": [m.seq for m in messages]}


@pytest.mark.timeout(90)
def test_backward_drop_oldest_keeps_the_newest_targets_and_counts_the_rest() -> None:
    capacity, count = 3, 10
    stage0, stage1 = run_ranks(_drop_oldest_rank, 2, capacity, count)
    assert stage1 == {"closed": True}  # every send completed though nobody consumed
    assert stage0 == {
        "depth": capacity,
        "dropped": count - capacity,
        "seqs": list(range(count - capacity, count)),
    }


def _backpressure_rank(rank: int, capacity: int, blocked: Event, backend: str) -> Result:
    dev = _device(rank, backend)
    shape, count = (4, 6), 6
    if rank == 0:
        sender = tt.TorchSender(1, "forward", dev, max_in_flight=1)
        batches = [_forward(seq, shape) for seq in range(count)]
        ahead = capacity + 1  # the receiver's slots, and the message its thread holds
        for message in batches[:ahead]:  # generous timeout: the peer may still be starting up
            sender.send(message, timeout=WAIT_S)
        timeouts = 0
        for _ in range(2):  # no credit left: a retry does not get through either
            try:
                sender.send(batches[ahead], timeout=0.3)
            except TimeoutError:
                timeouts += 1
        _wait_until(lambda: sender.sent == capacity, "the deliveries to be reported")
        blocked.set()
        for message in batches[ahead:]:  # a timed-out message was not sent: send it again
            sender.send(message, timeout=WAIT_S)
        sender.send(_forward(count, shape, Kind.STOP), timeout=WAIT_S)
        closed = sender.close(WAIT_S)
        return {"timeouts": timeouts, "closed": closed, "sent": sender.sent}

    receiver = tt.TorchReceiver(0, "forward", capacity, Policy.BLOCK, dev)
    assert blocked.wait(WAIT_S), "producer never reported being blocked"
    depth = receiver.depth()
    # The receiver thread has the next recv posted (before it waited for a slot): over gloo the
    # next send would complete. Only the credit held the producer back, as it must over NCCL,
    # whose sends complete into the peer's buffer.
    messages = _drain(receiver)
    for received in messages:
        assert isinstance(received, ForwardMessage)
        assert torch.equal(received.activations.cpu(), _tensor(received.seq, shape))
    kinds = [int(m.kind) for m in messages if isinstance(m, ForwardMessage)]
    return {"depth": depth, "seqs": [m.seq for m in messages], "kinds": kinds}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend", ["gloo", _nccl(2)])
@pytest.mark.parametrize("capacity", [1, 3])
def test_forward_backpressure_bounds_the_producer_and_loses_nothing(
    capacity: int, backend: str
) -> None:
    """Over NCCL a send may complete into the peer's buffer: the credits must hold anyway."""
    blocked = mp.get_context("spawn").Event()
    producer, consumer = run_ranks(
        _backpressure_rank, 2, capacity, blocked, backend=backend, timeout_s=120
    )
    # Once ``capacity`` messages wait unconsumed in the receiver and one more is held, sends
    # time out.
    assert producer == {"timeouts": 2, "closed": True, "sent": 7}  # the STOP message too
    assert consumer["depth"] == capacity
    assert consumer["seqs"] == list(range(7))  # in order, none lost, none twice
    assert consumer["kinds"] == [int(Kind.TRAIN)] * 6 + [int(Kind.STOP)]


def _closed_receiver_rank(rank: int, filled: Event, closed: Event, backend: str) -> Result:
    shape, capacity = (4, 6), 2
    if rank == 0:
        sender = tt.TorchSender(1, "forward", CPU)
        for seq in range(capacity + 1):  # every credit: the next send must wait for one
            sender.send(_forward(seq, shape), timeout=WAIT_S)
        filled.set()
        assert closed.wait(WAIT_S), "the receiver never closed"
        started = time.monotonic()
        try:
            sender.send(_forward(capacity + 1, shape), timeout=WAIT_S)
            failure = "none"
        except ChannelClosed as error:
            failure = str(error)
        noticed_s = time.monotonic() - started
        # Its end-of-stream still reaches the closed receiver's posted recv (over gloo that
        # send completes); the receiver never reports it delivered, so close() must not either.
        return {"failure": failure, "fast": noticed_s < WAIT_S / 2, "closed": sender.close(2.0)}

    receiver = tt.TorchReceiver(0, "forward", capacity, Policy.BLOCK, CPU)
    assert filled.wait(WAIT_S), "the sender never used its credits"
    _wait_until(lambda: receiver.depth() == capacity, "the channel to fill")
    receiver.close()
    closed.set()
    return {}


@pytest.mark.timeout(90)
def test_a_closed_receiver_fails_the_sender_and_its_close_reports_no_delivery() -> None:
    context = mp.get_context("spawn")
    producer, _ = run_ranks(_closed_receiver_rank, 2, context.Event(), context.Event())
    assert producer == {
        "failure": "the forward receiver on rank 1 is closed",
        "fast": True,
        "closed": False,
    }


def _both_directions_rank(rank: int, count: int, shared_group: bool, backend: str) -> Result:
    shape = (256, 1024)
    group = tt.direction_group("forward") if shared_group else None
    if rank == 0:
        sender = tt.TorchSender(1, "forward", CPU, group=group)
        targets = tt.TorchReceiver(1, "backward", count, Policy.DROP_OLDEST, CPU, group=group)
        for seq in range(count):  # blocks on the small forward channel until rank 1 consumes
            sender.send(_forward(seq, shape), timeout=WAIT_S)
        assert sender.close(timeout=WAIT_S)
        _wait_until(lambda: targets.ended, "backward end-of-stream")
        received = _drain(targets)
        for message in received:
            assert isinstance(message, BackwardMessage)
            assert torch.equal(message.target, _tensor(10_000 + message.seq, shape))
        return {"seqs": [m.seq for m in received], "dropped": targets.dropped}

    activations = tt.TorchReceiver(0, "forward", 4, Policy.BLOCK, CPU, group=group)
    sender = tt.TorchSender(0, "backward", CPU, group=group)
    # Send every target before consuming anything: both sides send at once, large tensors.
    for seq in range(count):
        sender.send(BackwardMessage(seq, _tensor(10_000 + seq, shape)), timeout=WAIT_S)
    assert sender.close(timeout=WAIT_S)
    received = _drain(activations)
    for message in received:
        assert isinstance(message, ForwardMessage)
        assert torch.equal(message.activations, _tensor(message.seq, shape))
        assert torch.equal(message.labels, _labels(message.seq, shape[0]))
    return {"seqs": [m.seq for m in received]}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shared_group", [False, True], ids=["group-per-direction", "one-group"])
def test_both_directions_at_once_with_large_tensors(shared_group: bool) -> None:
    count = 50
    stage0, stage1 = run_ranks(_both_directions_rank, 2, count, shared_group)
    assert stage0 == {"seqs": list(range(count)), "dropped": 0}
    assert stage1 == {"seqs": list(range(count))}


def _peer_death_rank(rank: int, backend: str) -> Result:
    dev = _device(rank, backend)
    if rank == 1:
        receiver = tt.TorchReceiver(0, "forward", 1, Policy.BLOCK, dev)
        _wait_until(lambda: receiver.depth() == 1, "the first message")
        os._exit(_CRASH)  # no end-of-stream, no goodbye

    sender = tt.TorchSender(1, "forward", dev)
    targets = tt.TorchReceiver(1, "backward", 4, Policy.DROP_OLDEST, dev)
    sender.send(_forward(0, (2, 3)), timeout=WAIT_S)
    started = time.monotonic()
    failure = "no failure"
    try:
        sender.send(_forward(1, (2, 3)), timeout=WAIT_S)  # the credit beyond the one slot
        # The receiver held the first message unconsumed: this send waits for a credit, with no
        # data op of its own on the wire. Only the control path can tell it the peer died.
        started = time.monotonic()
        sender.send(_forward(2, (2, 3)), timeout=WAIT_S)
    except ChannelClosed as error:
        failure = repr(error.__cause__)
    noticed_s = time.monotonic() - started
    assert _drain(targets) == []  # the receiver from the dead peer stops too
    return {
        "skip_barrier": True,
        "failure": failure,
        "fast": noticed_s < WAIT_S / 2,
        "receiver_error": repr(targets.error),
    }


_CRASH = 17


@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend", ["gloo", _nccl(2)])
def test_a_dead_peer_surfaces_as_channel_closed_not_a_hang(backend: str) -> None:
    """Over NCCL too: the control group (gloo) notices, on both of the survivor's edges."""
    stage0, stage1 = run_ranks(
        _peer_death_rank, 2, crashes={1: _CRASH}, backend=backend, timeout_s=120
    )
    assert stage1 == {"exitcode": _CRASH}
    assert "closed" in stage0["failure"].lower() or "reset" in stage0["failure"].lower()
    assert stage0["fast"] and stage0["receiver_error"] != "None"


# --- three processes --------------------------------------------------------------------------


def _chain_rank(rank: int, count: int, backend: str) -> Result:
    dev = _device(rank, backend)
    shape = (4, 6)
    if rank == 0:
        sender = tt.TorchSender(1, "forward", dev)
        targets = tt.TorchReceiver(1, "backward", count, Policy.DROP_OLDEST, dev)
        for seq in range(count):
            sender.send(_forward(seq, shape), timeout=WAIT_S)
        sender.send(_forward(count, shape, Kind.STOP), timeout=WAIT_S)
        assert sender.close(timeout=WAIT_S)
        received = _drain(targets)
        for message in received:
            assert isinstance(message, BackwardMessage)
            assert torch.equal(message.target.cpu(), 3 * _tensor(message.seq, shape))
        return {"targets": [m.seq for m in received]}

    if rank == 1:
        inputs = tt.TorchReceiver(0, "forward", 2, Policy.BLOCK, dev)
        outputs = tt.TorchSender(2, "forward", dev)
        to_stage0 = tt.TorchSender(0, "backward", dev)
        from_stage2 = tt.TorchReceiver(2, "backward", count, Policy.DROP_OLDEST, dev)
        while True:
            got = inputs.recv(timeout=WAIT_S)
            assert isinstance(got, ForwardMessage)
            h = 2 * got.activations
            outputs.send(ForwardMessage(got.seq, got.kind, h, got.labels), WAIT_S)
            if got.kind is Kind.STOP:
                break
            to_stage0.send(BackwardMessage(got.seq, 3 * got.activations), WAIT_S)
        assert outputs.close(timeout=WAIT_S)
        assert _drain(inputs) == []  # only end-of-stream was left
        received = _drain(from_stage2)
        for message in received:
            assert isinstance(message, BackwardMessage)
            assert torch.equal(message.target.cpu(), 2 * _tensor(message.seq, shape) + 1)
        assert to_stage0.close(timeout=WAIT_S)
        return {"targets": [m.seq for m in received]}

    inputs = tt.TorchReceiver(1, "forward", 2, Policy.BLOCK, dev)
    to_stage1 = tt.TorchSender(1, "backward", dev)
    seqs = []
    for message in _stream(inputs):
        assert isinstance(message, ForwardMessage)
        assert torch.equal(message.activations.cpu(), 2 * _tensor(message.seq, shape))
        assert torch.equal(message.labels.cpu(), _labels(message.seq, shape[0]))
        seqs.append(message.seq)
        if message.kind is Kind.STOP:
            assert to_stage1.close(timeout=WAIT_S)
        else:
            to_stage1.send(BackwardMessage(message.seq, message.activations + 1), WAIT_S)
    return {"seqs": seqs}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["gloo", _nccl(3)])
def test_three_stage_chain_forward_and_backward(backend: str) -> None:
    """The middle stage holds four edges on two communicators (one per direction)."""
    count = 12
    stage0, stage1, stage2 = run_ranks(_chain_rank, 3, count, backend=backend, timeout_s=150)
    assert stage2 == {"seqs": list(range(count + 1))}  # the STOP message too
    assert stage1 == {"targets": list(range(count))}
    assert stage0 == {"targets": list(range(count))}


# --- NCCL ----------------------------------------------------------------------------------------


def _nccl_rank(rank: int, count: int, backend: str) -> Result:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    shape = (256, 1024)
    if rank == 0:
        sender = tt.TorchSender(1, "forward", device)
        targets = tt.TorchReceiver(1, "backward", count, Policy.DROP_OLDEST, device)
        for seq in range(count):
            sender.send(_forward(seq, shape), timeout=WAIT_S)  # CPU tensors are moved over
        assert sender.close(timeout=WAIT_S)
        received = _drain(targets)
        for message in received:
            assert isinstance(message, BackwardMessage)
            assert message.target.device == device
            assert torch.equal(message.target.cpu(), _tensor(message.seq, shape) + 1)
        return {"seqs": [m.seq for m in received]}

    inputs = tt.TorchReceiver(0, "forward", 2, Policy.BLOCK, device)
    sender = tt.TorchSender(0, "backward", device)
    seqs = []
    for message in _stream(inputs):
        assert isinstance(message, ForwardMessage)
        # 256 labels travel in the header: they arrive on the host, the activations on the GPU.
        assert message.activations.device == device and message.labels.device == CPU
        assert torch.equal(message.activations.cpu(), _tensor(message.seq, shape))
        assert torch.equal(message.labels.cpu(), _labels(message.seq, shape[0]))
        sender.send(BackwardMessage(message.seq, message.activations + 1), timeout=WAIT_S)
        seqs.append(message.seq)
    assert sender.close(timeout=WAIT_S)
    return {"seqs": seqs}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.timeout(180)
def test_nccl_both_directions_on_cuda() -> None:
    count = 20
    stage0, stage1 = run_ranks(_nccl_rank, 2, count, backend="nccl", timeout_s=150)
    assert stage0 == {"seqs": list(range(count))}
    assert stage1 == {"seqs": list(range(count))}
