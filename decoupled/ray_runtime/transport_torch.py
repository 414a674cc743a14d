"""The torch.distributed data plane: point-to-point channels between stage processes.

One ``TorchSender`` and one ``TorchReceiver`` per directed edge and direction. Stage i holds a
forward sender to i+1 and a backward receiver from i+1; stage i+1 holds the matching forward
receiver and backward sender. Ray-free on purpose: the actors open the process group, but this
module only needs ranks and an address, so plain processes can test it.

Wire format, per message, all on one tag (see ``TAGS``), in this order:

1. header: int64 tensor of shape ``(header_len(direction),)``: the ``HEADER_LEN`` fields laid
   out by ``encode_header``, then (forward only) ``INLINE_LABELS`` slots that carry int64 labels
   of at most that many elements;
2. payload: the activations (forward) or target (backward) with exactly the header's dtype/shape;
3. labels (forward only, when not inline): the header's labels dtype/shape.

Tensors with no elements are not put on the wire at all (both ends know the shape from the
header). End-of-stream is a header alone.

Design points, measured with gloo on torch 2.13, 2 cores (probes and tests):

- Backpressure is explicit: each receiver reports to its sender, over a gloo control group
  (``open_process_group`` makes it, whatever the data backend), how many messages it delivered
  and how many the sender may have posted in all (a credit per free slot of a Policy.BLOCK
  channel, and one for the message its thread holds while it waits for a slot: the bound the
  channel had when it rested on gloo's rendezvous, one message on the wire beyond the slots,
  which the capacity measurements in docs/performance.md used). It cannot rest on when a send
  completes: gloo's point-to-point send completes only
  once the peer posted the matching recv, but NCCL's can complete into the peer's buffer
  (NVIDIA/nccl#544), so a producer could run ahead, count deliveries that never happened, and
  notice a dead peer only by a timeout. The sender's listener thread always has a gloo recv
  posted for the next report: a dead receiver ends it at once, so ``send`` raises
  ChannelClosed even when the data travels over NCCL.
- gloo's ``Work.is_completed()`` stays False for send/recv until someone called ``wait()``, and
  ``get_future()`` is not implemented. ``wait(timeout)`` that expires, and a plain ``wait()``
  once the group timeout passed, close *every* pair of the group ("Application timeout caused
  pair closure"). So every wait here is untimed, on groups whose timeout is ``DATA_TIMEOUT``
  (days); a sender's waits run on a helper thread, and callers wait on an event with their own
  deadline. A dead peer still ends a wait at once ("Connection closed by peer").
- NCCL's ``wait()`` does not block the host: helper threads order the op before a stream of
  their own and sleep on a blocking-sync CUDA event recorded there (``_wait_all``), rather than
  polling ``is_completed()``, and read received headers on that stream too, so no helper waits
  for the compute thread's queued kernels.
- One thread sending and any number of threads receiving, or several threads sending to
  different peers, on one gloo group, with or without separate groups per direction: no
  corruption, no deadlock (3 ranks, 150 messages of mixed shapes each way, 10 runs). The only
  thing to serialise is the ops of one edge and direction (they are matched in posting order),
  which each sender (a lock) and receiver (one thread) does.
- NCCL ignores tags and runs every op between two ranks of a group on one stream, so a recv
  posted ahead (by a receiver thread) would hold back a send the other way between the same two
  ranks. ``open_process_group`` therefore opens one group per direction: on every group, each
  pair of ranks carries one direction only. gloo gets the same split, and the tags besides.
"""

from __future__ import annotations

import collections
import enum
import math
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Final, Literal

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, Work

from decoupled.channel import (
    BackwardMessage,
    ChannelClosed,
    ForwardMessage,
    Kind,
    LocalChannel,
    Message,
    Policy,
)

Direction = Literal["forward", "backward"]
DIRECTIONS: Final[tuple[Direction, ...]] = ("forward", "backward")

# Distinct per direction so that, even on one shared group, the two directions between the same
# two ranks can never match each other's recvs (gloo matches on source, destination and tag).
TAGS: Final[dict[Direction, int]] = {"forward": 1, "backward": 2}

# A receiver may legitimately sit idle for long (evaluation, checkpoints, a slow stage): the group
# timeout must outlast any such pause, because an expired gloo wait breaks the whole group.
DATA_TIMEOUT: Final = timedelta(days=7)

HEADER_LEN: Final = 32
# Forward headers carry the labels of a batch of up to this many samples: gloo send/recv is a
# rendezvous, so each op per message costs a cross-process round trip (~0.2 ms on 2 cores) and
# 8 KB more in a header that is sent anyway is far cheaper than a third op.
INLINE_LABELS: Final = 1024
MAX_NDIM: Final = 8
MAGIC: Final = 0x444E4931  # "DNI1": catches a receiver reading payload bytes as a header

# dtype codes on the wire; the position in this tuple is the code, so only ever append.
WIRE_DTYPES: Final[tuple[torch.dtype, ...]] = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
_DTYPE_CODES: Final[dict[torch.dtype, int]] = {
    dtype: code for code, dtype in enumerate(WIRE_DTYPES)
}


class WireType(enum.IntEnum):
    FORWARD = 0
    BACKWARD = 1
    END = 2  # end-of-stream: no tensors follow, the receiver thread stops


# Header slots (int64 each); slots from _H_RESERVED on are zero and left for later versions.
_H_MAGIC = 0
_H_TYPE = 1
_H_KIND = 2
_H_SEQ = 3
_H_DTYPE = 4
_H_NDIM = 5
_H_SHAPE = 6  # MAX_NDIM slots
_H_HAS_LABELS = _H_SHAPE + MAX_NDIM
_H_LABELS_DTYPE = _H_HAS_LABELS + 1
_H_LABELS_NDIM = _H_LABELS_DTYPE + 1
_H_LABELS_SHAPE = _H_LABELS_NDIM + 1  # MAX_NDIM slots
_H_LABELS_INLINE = _H_LABELS_SHAPE + MAX_NDIM
_H_RESERVED = _H_LABELS_INLINE + 1
assert _H_RESERVED <= HEADER_LEN


class ProtocolError(RuntimeError):
    """Bytes on an edge are not what its receiver expects (a mismatched peer or a stolen recv)."""


@dataclass(frozen=True)
class Header:
    """A decoded header: what follows it on the wire."""

    wire_type: WireType
    kind: Kind  # PROBE or TRAIN for backward messages; unused for end-of-stream
    seq: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    labels: tuple[torch.dtype, tuple[int, ...]] | None
    labels_inline: bool = False  # the labels sit in the header's INLINE_LABELS slots


def _put_tensor_spec(
    fields: list[int], dtype_slot: int, ndim_slot: int, shape_slot: int, tensor: torch.Tensor
) -> None:
    if tensor.dtype not in _DTYPE_CODES:
        raise TypeError(f"dtype {tensor.dtype} cannot travel; supported: {list(WIRE_DTYPES)}")
    if tensor.dim() > MAX_NDIM:
        raise ValueError(f"tensors of at most {MAX_NDIM} dims can travel, got {tensor.dim()}")
    fields[dtype_slot] = _DTYPE_CODES[tensor.dtype]
    fields[ndim_slot] = tensor.dim()
    fields[shape_slot : shape_slot + tensor.dim()] = tensor.shape


def _get_tensor_spec(
    fields: list[int], dtype_slot: int, ndim_slot: int, shape_slot: int
) -> tuple[torch.dtype, tuple[int, ...]]:
    code, ndim = fields[dtype_slot], fields[ndim_slot]
    if not 0 <= code < len(WIRE_DTYPES) or not 0 <= ndim <= MAX_NDIM:
        raise ProtocolError(f"bad tensor spec in header: dtype code {code}, ndim {ndim}")
    shape = tuple(fields[shape_slot : shape_slot + ndim])
    if any(dim < 0 for dim in shape):
        raise ProtocolError(f"negative dimension in header shape {shape}")
    return WIRE_DTYPES[code], shape


def encode_header(message: Message | None) -> list[int]:
    """The ``HEADER_LEN`` int64 fields announcing ``message`` (None: end-of-stream)."""
    fields = [0] * HEADER_LEN
    fields[_H_MAGIC] = MAGIC
    if message is None:
        fields[_H_TYPE] = WireType.END
        return fields
    if not -(2**63) <= message.seq < 2**63:
        raise ValueError(f"seq {message.seq} does not fit in int64")
    fields[_H_SEQ] = message.seq
    if isinstance(message, ForwardMessage):
        fields[_H_TYPE] = WireType.FORWARD
        fields[_H_KIND] = Kind(message.kind)
        _put_tensor_spec(fields, _H_DTYPE, _H_NDIM, _H_SHAPE, message.activations)
        fields[_H_HAS_LABELS] = 1
        _put_tensor_spec(fields, _H_LABELS_DTYPE, _H_LABELS_NDIM, _H_LABELS_SHAPE, message.labels)
        fields[_H_LABELS_INLINE] = int(_inline(message.labels))
    else:
        fields[_H_TYPE] = WireType.BACKWARD
        fields[_H_KIND] = Kind(message.kind)
        _put_tensor_spec(fields, _H_DTYPE, _H_NDIM, _H_SHAPE, message.target)
    return fields


def decode_header(fields: list[int]) -> Header:
    """Inverse of ``encode_header``; ProtocolError on anything that is not a valid header."""
    if len(fields) != HEADER_LEN or fields[_H_MAGIC] != MAGIC:
        raise ProtocolError(f"not a message header (length {len(fields)}, magic {fields[:1]})")
    try:
        wire_type = WireType(fields[_H_TYPE])
        kind = Kind(fields[_H_KIND])
    except ValueError as error:
        raise ProtocolError(f"bad header: {error}") from error
    if wire_type is WireType.END:
        return Header(wire_type, kind, 0, torch.float32, (), None)
    dtype, shape = _get_tensor_spec(fields, _H_DTYPE, _H_NDIM, _H_SHAPE)
    labels = None
    if fields[_H_HAS_LABELS]:
        labels = _get_tensor_spec(fields, _H_LABELS_DTYPE, _H_LABELS_NDIM, _H_LABELS_SHAPE)
    if (wire_type is WireType.FORWARD) != (labels is not None):
        raise ProtocolError("forward messages carry labels, backward messages do not")
    inline = bool(fields[_H_LABELS_INLINE])
    if inline and (
        labels is None or labels[0] is not torch.int64 or math.prod(labels[1]) > INLINE_LABELS
    ):
        raise ProtocolError(f"labels {labels} cannot be inline")
    return Header(wire_type, kind, fields[_H_SEQ], dtype, shape, labels, inline)


def _inline(labels: torch.Tensor) -> bool:
    """Whether ``labels`` travel in the header's INLINE_LABELS slots."""
    return labels.dtype is torch.int64 and 0 < labels.numel() <= INLINE_LABELS


def header_len(direction: Direction) -> int:
    """Elements of the int64 header tensor on a ``direction`` edge."""
    return HEADER_LEN + (INLINE_LABELS if direction == "forward" else 0)


# --- process group -------------------------------------------------------------------------------

_DATA_GROUPS: dict[Direction, ProcessGroup] = {}
_CONTROL_GROUPS: list[ProcessGroup] = []


def free_port() -> int:
    """A TCP port free on this host right now (another process may still take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def open_process_group(
    rank: int, world_size: int, address: str, port: int, backend: str, timeout_s: float
) -> None:
    """Join the process group of all stages (every rank calls this with the same arguments).

    ``address:port`` is the TCP rendezvous, hosted by rank 0. ``timeout_s`` bounds the
    rendezvous and collectives on the default group; the per-direction data groups and the
    control group created here use ``DATA_TIMEOUT`` instead, because their waits are untimed by
    design (see module doc). ``backend``: "gloo" for CPU tensors, "nccl" for CUDA tensors (one
    GPU per rank; do not bind a device_id: that would put all point-to-point traffic of a group
    on one NCCL stream). The control group is gloo whatever the backend.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if dist.is_initialized():
        raise RuntimeError("a process group is already open in this process")
    host = f"[{address}]" if ":" in address else address
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{host}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    ranks = list(range(world_size))
    for direction in DIRECTIONS:
        group = dist.new_group(
            ranks, timeout=DATA_TIMEOUT, backend=backend, group_desc=f"decoupled_{direction}"
        )
        if group is None:
            raise RuntimeError(f"this rank is not in the {direction} group")
        _DATA_GROUPS[direction] = group
    control = dist.new_group(
        ranks, timeout=DATA_TIMEOUT, backend="gloo", group_desc="decoupled_control"
    )
    if control is None:
        raise RuntimeError("this rank is not in the control group")
    _CONTROL_GROUPS[:] = [control]


def close_process_group() -> None:
    """Destroy the data groups, the control group and the default group, if open.

    Close senders first (so peers see end-of-stream) and let every rank get there (a barrier
    on the default group) so nobody tears down sockets under a message still in flight.
    """
    _DATA_GROUPS.clear()
    _CONTROL_GROUPS.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


def direction_group(direction: Direction) -> ProcessGroup:
    """The data group ``open_process_group`` made for ``direction``."""
    try:
        return _DATA_GROUPS[direction]
    except KeyError:
        raise RuntimeError(
            "no data group: call open_process_group first, or pass a group explicitly"
        ) from None


def control_group() -> ProcessGroup:
    """The gloo group ``open_process_group`` made for credits and acknowledgements."""
    if not _CONTROL_GROUPS:
        raise RuntimeError(
            "no control group: call open_process_group first, or pass one explicitly"
        )
    return _CONTROL_GROUPS[0]


def _resolve(
    group: ProcessGroup | None, direction: Direction, device: torch.device
) -> ProcessGroup:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    resolved = group if group is not None else direction_group(direction)
    backend = str(dist.get_backend(resolved))
    wanted = "nccl" if device.type == "cuda" else "gloo"
    if backend != wanted:
        raise ValueError(f"{device.type} tensors travel over {wanted}, the group is {backend}")
    return resolved


def _resolve_control(group: ProcessGroup | None) -> ProcessGroup:
    resolved = group if group is not None else control_group()
    backend = str(dist.get_backend(resolved))
    if backend != "gloo":
        raise ValueError(f"the control group must be gloo, it is {backend}")
    return resolved


def _concrete(device: torch.device) -> torch.device:
    """``device`` with its index filled in: helper threads must select the same CUDA device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _group_rank(group: ProcessGroup, peer: int) -> int:
    """``peer`` (a global rank) as a rank of ``group``; ValueError if it is not a member."""
    try:
        return dist.get_group_rank(group, peer)
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"rank {peer} is not in the group: {error}") from error


def _helper_stream(device: torch.device) -> torch.cuda.Stream | None:
    """For a helper thread on a CUDA ``device``: select the device, return a stream of the
    thread's own to wait on (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.set_device(device)
    return torch.cuda.Stream(device)


def _wait_all(works: list[Work], stream: torch.cuda.Stream | None) -> None:
    """Block the calling thread until every op in ``works`` finished (untimed, see module doc).

    ``stream``: None for gloo ops. For NCCL ops, the helper thread's own stream: NCCL's
    ``wait()`` only orders the current stream after the op, so the ops are ordered before
    ``stream``, and the thread sleeps on an event recorded there (a blocking-sync event: no
    spinning, the GIL released). Waiting on the default stream instead would also wait for the
    compute thread's queued kernels."""
    if stream is None:
        for work in works:
            work.wait()
        return
    with torch.cuda.stream(stream):
        for work in works:
            work.wait()
    done = torch.cuda.Event(blocking=True)
    done.record(stream)
    done.synchronize()


# --- control: credits and acknowledgements ------------------------------------------------------
#
# Each receiver reports to its sender, on the gloo control group and the edge's tag, an int64
# tensor of CONTROL_LEN fields: magic, messages delivered into its channel so far, the number of
# messages the sender may have posted in all (its credit: consumed + capacity + 1 for Policy.BLOCK,
# UNLIMITED for Policy.DROP_OLDEST), and a final state. The counts are cumulative, so the
# receiver coalesces reports: it sends the latest whenever something changed. The sender's
# listener thread always has a recv posted for the next report: its failure is how a dead
# receiver is noticed, over gloo, even when the data travels over NCCL. The other way round,
# each receiver's watch thread has a recv posted on WATCH_TAGS that the sender completes with
# a goodbye in ``close``: it fails when the sender's process dies first.

CONTROL_LEN: Final = 4
CONTROL_MAGIC: Final = 0x444E4943  # "DNIC"
UNLIMITED: Final = -1
WATCH_TAGS: Final[dict[Direction, int]] = {"forward": 3, "backward": 4}


class PeerState(enum.IntEnum):
    OPEN = 0
    ENDED = 1  # end-of-stream arrived: the last report, with the final delivered count
    CLOSED = 2  # the receiver was closed before end-of-stream: messages after it are lost


# --- sender --------------------------------------------------------------------------------------


@dataclass(eq=False)
class _InFlight:
    """A posted message; ``tensors`` stay referenced until its send ops completed."""

    message: Message | None  # None: end-of-stream
    works: list[Work]
    tensors: list[torch.Tensor]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class _Waiter:
    """A helper thread that waits on posted sends, oldest first, and marks them done.

    gloo gives no other completion signal (see module doc), and it lets callers wait with a
    deadline. Only this thread may wait on a send: a gloo send buffer counts completions, so a
    second waiter on the same op would wait forever.
    """

    def __init__(self, name: str, device: torch.device) -> None:
        self._device = device
        self._queue: queue.SimpleQueue[_InFlight | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: _InFlight) -> None:
        self._queue.put(item)

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        setup_error: BaseException | None = None
        stream = None
        try:
            stream = _helper_stream(self._device)
        except BaseException as error:  # every send then fails with it rather than hanging
            setup_error = error
        while (item := self._queue.get()) is not None:
            try:
                if setup_error is not None:
                    raise setup_error
                _wait_all(item.works, stream)
            except BaseException as error:  # surfaced by the sender, on the caller's thread
                item.error = error
            finally:
                item.done.set()


# Edges with a live thread that has a recv posted: receivers' data threads (key: the data
# group) and senders' listeners (key: the control group). A thread closed without its peer's
# last word may still wait in such a recv; a second one on the edge would race it for messages.
_RECEIVING: dict[tuple[int, int, int], threading.Thread] = {}
_RECEIVING_LOCK = threading.Lock()


def _claim(key: tuple[int, int, int], thread: threading.Thread, what: str) -> None:
    with _RECEIVING_LOCK:
        other = _RECEIVING.get(key)
        if other is not None and other.is_alive():
            raise RuntimeError(
                f"{what} already has a receiver thread (an earlier one closed before its peer's "
                "last message still waits on it); reopen the group"
            )
        _RECEIVING[key] = thread


def _release(key: tuple[int, int, int], thread: threading.Thread) -> None:
    with _RECEIVING_LOCK:
        if _RECEIVING.get(key) is thread:
            del _RECEIVING[key]


class TorchSender:
    """Sends one direction of one edge to rank ``peer``. Implements ``channel.Sender``.

    Forward senders take ``ForwardMessage`` (activations (B, ...) of any wire dtype, labels (B,)
    int64), backward senders ``BackwardMessage`` (target (B, ...)). ``send`` posts the message and
    returns while the transfer runs (overlapping it with the caller's compute). It first waits
    for a credit from the receiver (a Policy.BLOCK receiver grants one per free slot of its
    channel and one more, so the producer is never more than ``capacity + 1`` messages ahead of
    what the peer's consumer took, whatever the backend does with a send), then until fewer than
    ``max_in_flight`` earlier sends are still running. A timeout never leaves a message
    half-sent: TimeoutError means ``message`` was not posted at all.

    Tensors are moved to ``device`` and made contiguous when needed, otherwise sent from their
    own memory: do not modify them in place until they are delivered (``flush``). Labels of at
    most INLINE_LABELS elements travel in the header, which is built on the host: CUDA labels
    cost a device-to-host copy (a sync); a receiver hands inline labels out on the host, so a
    stage that forwards what it received never pays it. One sender per edge and direction;
    calls from several threads are serialised.
    """

    def __init__(
        self,
        peer: int,
        direction: Direction,
        device: torch.device,
        group: ProcessGroup | None = None,
        max_in_flight: int = 1,
        control: ProcessGroup | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.peer = peer
        self.direction: Direction = direction
        self._group = _resolve(group, direction, torch.device(device))
        self._control = _resolve_control(control)
        self.device = _concrete(device)
        self.max_in_flight = max_in_flight
        self._group_peer = _group_rank(self._group, peer)
        self._control_peer = _group_rank(self._control, peer)
        self._tag = TAGS[direction]
        self._message_type = ForwardMessage if direction == "forward" else BackwardMessage
        self._lock = threading.Lock()
        self._in_flight: collections.deque[_InFlight] = collections.deque()
        self._closed = False
        self._end_sent = False
        # What the receiver reported (see "control" above), guarded by _reports.
        self._reports = threading.Condition()
        self._posted = 0  # data messages posted
        self._delivered = 0
        self._granted = 0  # nothing may be posted before the receiver's first report
        self._peer_state = PeerState.OPEN
        self._peer_error: BaseException | None = None
        self._key = (id(self._control), peer, self._tag)
        self._listener = threading.Thread(
            target=self._listen, name=f"credit-{direction}-from-{peer}", daemon=True
        )
        _claim(self._key, self._listener, f"{direction} control edge from rank {peer}")
        self._listener.start()
        self._waiter = _Waiter(f"send-{direction}-to-{peer}", self.device)

    @property
    def sent(self) -> int:
        """Messages the receiver reported delivered into its channel (not merely sent)."""
        with self._reports:
            return self._delivered

    @property
    def in_flight(self) -> int:
        """Messages posted whose send ops have not completed (a figure for the stats)."""
        return len(self._in_flight)

    def send(self, message: Message, timeout: float | None = None) -> None:
        """Post ``message`` once the receiver granted a credit for it and fewer than
        ``max_in_flight`` earlier sends are running.

        TimeoutError: no credit within ``timeout`` seconds (the peer's channel is full:
        backpressure), or an earlier send still running; ``message`` was not sent, retrying it
        is safe. ChannelClosed: the sender is closed, the receiver was closed, or the peer is
        gone (the cause is chained): noticed at once through the control group.
        """
        if not isinstance(message, self._message_type):
            raise TypeError(
                f"a {self.direction} sender takes {self._message_type.__name__}, "
                f"got {type(message).__name__}"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            raise TimeoutError(f"another send to rank {self.peer} held the sender for {timeout}s")
        try:
            if self._closed:
                raise ChannelClosed(f"send on a closed {self.direction} sender to rank {self.peer}")
            self._await_credit(message.seq, deadline)
            self._settle(self.max_in_flight - 1, deadline)
            self._post(message)
        finally:
            self._lock.release()

    def close(self, timeout: float | None = 10.0) -> bool:
        """Send end-of-stream after what is in flight; True if the receiver reported every
        message and the end-of-stream delivered.

        The peer's receiver thread then stops and its ``recv`` raises ChannelClosed once drained.
        False when that was not reported within ``timeout`` (the peer is gone or was closed, or
        a send could not complete); the sender is closed either way.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            return False
        try:
            if not self._closed:
                self._closed = True
                try:
                    self._settle(0, deadline)
                    self._post(None)
                    self._settle(0, deadline)
                    self._await_reports(
                        lambda: self._peer_state is not PeerState.OPEN, "end-of-stream", deadline
                    )
                    self._end_sent = (
                        self._peer_state is PeerState.ENDED and self._delivered == self._posted
                    )
                except (TimeoutError, ChannelClosed):
                    pass
                self._goodbye()
                self._waiter.stop()
            return self._end_sent
        finally:
            self._lock.release()

    def _goodbye(self) -> None:
        """End the receiver's watch (see "control"). Not waited for here: a receiver that was
        never made would hold it forever, so the waiter thread keeps it until it completes."""
        farewell = torch.zeros(1, dtype=torch.int64)
        try:
            work = self._control.send([farewell], self._control_peer, WATCH_TAGS[self.direction])
        except RuntimeError:  # the group is broken: the peer learns of this sender's end anyway
            return
        self._waiter.submit(_InFlight(None, [work], [farewell]))

    def _await_credit(self, seq: int, deadline: float | None) -> None:
        def granted() -> bool:
            # A credit left over does not make a closed or dead receiver worth sending to.
            if self._peer_error is not None or self._peer_state is not PeerState.OPEN:
                return False
            return self._granted == UNLIMITED or self._posted < self._granted

        try:
            self._await_reports(granted, "a credit", deadline)
        except TimeoutError:
            raise TimeoutError(
                f"rank {self.peer} gave no credit for {self.direction} message seq={seq} "
                "within the timeout (its channel is full)"
            ) from None

    def _await_reports(self, ready: Callable[[], bool], what: str, deadline: float | None) -> None:
        """Wait until ``ready()`` holds on the receiver's reports; ChannelClosed if the peer
        went away or was closed first. Call with ``_lock`` held."""
        with self._reports:
            while not ready():
                if self._peer_error is not None:
                    self._closed = True
                    raise ChannelClosed(
                        f"{self.direction} edge to rank {self.peer} failed: {self._peer_error}"
                    ) from self._peer_error
                if self._peer_state is not PeerState.OPEN:
                    self._closed = True
                    raise ChannelClosed(
                        f"the {self.direction} receiver on rank {self.peer} is "
                        f"{self._peer_state.name.lower()}"
                    )
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"rank {self.peer} reported no {what} in time")
                self._reports.wait(remaining)

    def _listen(self) -> None:
        """Receive the receiver's reports until its last one, or until the edge fails."""
        report = torch.zeros(CONTROL_LEN, dtype=torch.int64)
        try:
            while True:
                self._control.recv([report], self._control_peer, self._tag).wait()
                magic, delivered, granted, state = report.tolist()
                if magic != CONTROL_MAGIC or not 0 <= state < len(PeerState):
                    raise ProtocolError(f"not a control report from rank {self.peer}: {report}")
                with self._reports:
                    self._delivered = max(self._delivered, delivered)
                    self._granted = granted if granted == UNLIMITED else max(self._granted, granted)
                    self._peer_state = PeerState(state)
                    self._reports.notify_all()
                if state != PeerState.OPEN:
                    return
        except BaseException as error:
            with self._reports:
                self._peer_error = error
                self._reports.notify_all()
        finally:
            _release(self._key, self._listener)

    def _post(self, message: Message | None) -> None:
        fields = encode_header(message)  # validates dtypes/shapes before anything is posted
        header = torch.zeros(header_len(self.direction), dtype=torch.int64)
        header[:HEADER_LEN] = torch.tensor(fields, dtype=torch.int64)
        tensors = [header]
        if isinstance(message, ForwardMessage):
            tensors.append(message.activations)
            if _inline(message.labels):
                header[HEADER_LEN : HEADER_LEN + message.labels.numel()] = (
                    message.labels.detach().reshape(-1).cpu()  # a no-op for host labels
                )
            else:
                tensors.append(message.labels)
        elif isinstance(message, BackwardMessage):
            tensors.append(message.target)
        # Host to GPU without waiting: a blocking copy would sync the compute stream, i.e. wait
        # for the queued backward pass; the NCCL op is ordered after the copy anyway. The other
        # way (CUDA tensors on a gloo edge) must block: gloo reads the host copy right away.
        to_gpu = self.device.type == "cuda"
        tensors = [t.detach().to(self.device, non_blocking=to_gpu).contiguous() for t in tensors]
        try:
            # ProcessGroup.send directly: the dist.isend wrapper costs ~25 us of Python a call,
            # which made a 800 KB message 30% slower than raw send/recv on 2 cores.
            works = [
                self._group.send([t], self._group_peer, self._tag) for t in tensors if t.numel()
            ]
        except RuntimeError as error:  # a broken group refuses new ops outright
            self._closed = True
            raise ChannelClosed(
                f"{self.direction} send to rank {self.peer} failed: {error}"
            ) from error
        if message is not None:
            with self._reports:
                self._posted += 1
        item = _InFlight(message, works, tensors)
        self._in_flight.append(item)
        self._waiter.submit(item)

    def _settle(self, keep: int, deadline: float | None) -> None:
        """Wait until at most ``keep`` posted messages have send ops running, oldest first."""
        while len(self._in_flight) > keep:
            oldest = self._in_flight[0]
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not oldest.done.wait(remaining):
                raise TimeoutError(
                    f"the send of {self.direction} message "
                    f"seq={getattr(oldest.message, 'seq', 'end-of-stream')} to rank {self.peer} "
                    "did not complete within the timeout"
                )
            self._in_flight.popleft()
            if oldest.error is not None:
                self._closed = True
                raise ChannelClosed(
                    f"{self.direction} send to rank {self.peer} failed: {oldest.error}"
                ) from oldest.error


# --- receiver ------------------------------------------------------------------------------------


class TorchReceiver:
    """Receives one direction of one edge from rank ``peer``. Implements ``channel.Receiver``.

    A daemon thread receives messages into a ``LocalChannel(capacity, policy)``; tensors arrive
    on ``device``, except labels that travelled in the header, which stay on the host (no sync
    to read them; consumers move labels where they need them). A second thread reports to the
    sender (see "control"): Policy.BLOCK (forward) grants the sender one credit per free slot
    and one for the message the thread holds while it waits for a slot, so the peer's ``send``
    blocks while ``capacity`` messages wait here unconsumed and one more is held;
    Policy.DROP_OLDEST (backward) grants without limit, and the channel drops its oldest message
    when full, counted in ``dropped``; the peer never blocks for long.
    On end-of-stream the thread stops; ``recv`` drains what is left, then raises ChannelClosed.
    """

    def __init__(
        self,
        peer: int,
        direction: Direction,
        capacity: int,
        policy: Policy,
        device: torch.device,
        group: ProcessGroup | None = None,
        control: ProcessGroup | None = None,
    ) -> None:
        self.peer = peer
        self.direction: Direction = direction
        self._group = _resolve(group, direction, torch.device(device))
        self._control = _resolve_control(control)
        self.device = _concrete(device)
        self._group_peer = _group_rank(self._group, peer)
        self._control_peer = _group_rank(self._control, peer)
        self._tag = TAGS[direction]
        self._channel = LocalChannel(capacity, policy)
        self._capacity = capacity
        self._policy = policy
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._ended = False
        self._on_wire = False  # in an untimed wait for the peer: joining the thread is pointless
        # What the reporter thread tells the sender, guarded by _report.
        self._report = threading.Condition()
        self._delivered = 0
        self._consumed = 0
        self._state = PeerState.OPEN
        self._report_due = True  # the first report carries the first credits
        self._key = (id(self._group), peer, self._tag)
        self._thread = threading.Thread(
            target=self._run, name=f"recv-{direction}-from-{peer}", daemon=True
        )
        _claim(self._key, self._thread, f"{direction} edge from rank {peer}")
        self._reporter = threading.Thread(
            target=self._report_loop, name=f"credit-{direction}-to-{peer}", daemon=True
        )
        self._watch = threading.Thread(
            target=self._watch_loop, name=f"watch-{direction}-{peer}", daemon=True
        )
        self._thread.start()
        self._reporter.start()
        self._watch.start()

    def recv(self, timeout: float | None = None) -> Message | None:
        """Next message in order, or None when nothing arrived within ``timeout`` seconds."""
        try:
            message = self._channel.recv(timeout)
        except ChannelClosed:
            if self._error is not None:
                raise ChannelClosed(
                    f"{self.direction} receiver from rank {self.peer} failed: {self._error!r}"
                ) from self._error
            raise
        if message is not None and self._policy is Policy.BLOCK:
            self._note(consumed=1)  # a slot is free: one more credit
        return message

    def depth(self) -> int:
        return self._channel.depth()

    @property
    def dropped(self) -> int:
        """Messages evicted by Policy.DROP_OLDEST (always 0 with Policy.BLOCK)."""
        return self._channel.dropped

    @property
    def ended(self) -> bool:
        """True once end-of-stream arrived (the thread has stopped)."""
        return self._ended

    @property
    def error(self) -> BaseException | None:
        """Why the thread stopped, when it was not end-of-stream or ``close``."""
        return self._error

    def close(self, timeout: float = 1.0) -> None:
        """Stop delivering; messages not yet received are lost. Waits ``timeout`` for the thread.

        The sender is told (its sends then raise ChannelClosed). After end-of-stream this is
        instant. Without it the thread may sit in a posted recv until the peer sends or its
        process goes away (nothing can cancel a posted gloo recv); it is a daemon thread, and
        this edge cannot get a new receiver until it is gone.
        """
        self._stopping.set()
        self._channel.close()
        self._note(state=PeerState.CLOSED)
        if not self._on_wire:
            self._thread.join(timeout)

    def _note(
        self, delivered: int = 0, consumed: int = 0, state: PeerState = PeerState.OPEN
    ) -> None:
        """Record what the sender must hear; the reporter sends it (coalesced)."""
        with self._report:
            if self._state is not PeerState.OPEN:
                return  # the last report is made: nothing after it
            self._delivered += delivered
            self._consumed += consumed
            self._state = state
            self._report_due = True
            self._report.notify()

    def _report_loop(self) -> None:
        """Send the sender the latest counts whenever they changed, until the last report."""
        report = torch.zeros(CONTROL_LEN, dtype=torch.int64)
        try:
            while True:
                with self._report:
                    while not self._report_due:
                        self._report.wait()
                    self._report_due = False
                    granted = (
                        self._consumed + self._capacity + 1
                        if self._policy is Policy.BLOCK
                        else UNLIMITED
                    )
                    fields = [CONTROL_MAGIC, self._delivered, granted, int(self._state)]
                    last = self._state is not PeerState.OPEN
                report.copy_(torch.tensor(fields, dtype=torch.int64))
                self._control.send([report], self._control_peer, self._tag).wait()
                if last:
                    return
        except BaseException as error:  # the sender's process is gone
            if not self._stopping.is_set() and not self._ended:
                self._error = error
                self._channel.close()

    def _watch_loop(self) -> None:
        """Wait for the sender's goodbye; if its process dies first, fail this receiver (the
        data thread may sit in an NCCL recv that never ends)."""
        farewell = torch.zeros(1, dtype=torch.int64)
        try:
            self._control.recv([farewell], self._control_peer, WATCH_TAGS[self.direction]).wait()
        except BaseException as error:
            if not self._stopping.is_set() and not self._ended:
                self._error = error
                self._channel.close()

    def _run(self) -> None:
        try:
            stream = _helper_stream(self.device)
            header = torch.empty(header_len(self.direction), dtype=torch.int64, device=self.device)
            header_work: Work | None = None
            while True:
                if header_work is None:
                    header_work = self._group.recv([header], self._group_peer, self._tag)
                self._on_wire = True
                _wait_all([header_work], stream)
                self._on_wire = False
                host = self._to_host(header, stream)
                decoded = self._decode(host)
                if decoded is None:
                    self._ended = True
                    self._note(state=PeerState.ENDED)
                    return
                message, works = self._post_body(decoded, host)
                # Post the next header recv before waiting for this body: gloo matches recvs in
                # order, and a recv already posted spares the sender a notify round trip and
                # this thread a wake-up when messages stream. The sender's credits, not this
                # thread, bound what arrives.
                header_work = self._group.recv([header], self._group_peer, self._tag)
                self._on_wire = True
                _wait_all(works, stream)
                self._on_wire = False
                if self._stopping.is_set():
                    return
                # BLOCK: waits for a slot, holding the one message the credits allow beyond them
                # (``close`` ends the wait); DROP_OLDEST: never waits.
                self._channel.send(message)
                self._note(delivered=1)
        except BaseException as error:
            if not self._stopping.is_set():
                self._error = error
        finally:
            self._channel.close()
            _release(self._key, self._thread)

    @staticmethod
    def _to_host(header: torch.Tensor, stream: torch.cuda.Stream | None) -> torch.Tensor:
        """The received ``header`` in host memory, copied on the thread's own stream (the
        recv is complete: the copy waits for nothing the compute thread queued)."""
        if stream is None:
            return header
        with torch.cuda.stream(stream):
            return header.cpu()

    def _decode(self, header: torch.Tensor) -> Header | None:
        """The header just received into ``header`` (host memory); None for end-of-stream."""
        decoded = decode_header(header[:HEADER_LEN].tolist())
        if decoded.wire_type is WireType.END:
            return None
        expected = WireType.FORWARD if self.direction == "forward" else WireType.BACKWARD
        if decoded.wire_type is not expected:
            raise ProtocolError(
                f"{self.direction} receiver got a {decoded.wire_type.name} message from rank "
                f"{self.peer}"
            )
        return decoded

    def _post_body(self, decoded: Header, header: torch.Tensor) -> tuple[Message, list[Work]]:
        """Allocate the tensors ``decoded`` announces and post their recvs (empty ones skipped);
        inline labels are copied out of ``header`` (host memory), whose buffer the next message
        reuses."""
        payload = torch.empty(decoded.shape, dtype=decoded.dtype, device=self.device)
        tensors = [payload]
        labels: torch.Tensor | None = None
        if decoded.labels is not None:
            labels_dtype, labels_shape = decoded.labels
            if decoded.labels_inline:
                size = math.prod(labels_shape)
                labels = header[HEADER_LEN : HEADER_LEN + size].clone().view(labels_shape)
            else:
                labels = torch.empty(labels_shape, dtype=labels_dtype, device=self.device)
                tensors.append(labels)
        works = [self._group.recv([t], self._group_peer, self._tag) for t in tensors if t.numel()]
        message: Message
        if decoded.wire_type is WireType.FORWARD:
            assert labels is not None
            message = ForwardMessage(decoded.seq, decoded.kind, payload, labels)
        else:
            message = BackwardMessage(decoded.seq, payload, decoded.kind)
        return message, works
