"""How pipeline messages travel between pp ranks: chosen once, at the runtime's construction.

Every transport is a `post(recvs, sends)` call: `recvs` and `sends` are (tensor, global
peer rank, tag) triples; it returns one handle per message (receives first) with `wait()`
and `is_completed()`. The runtime waits on a receive right before the compute that reads it.

- `batched_transport` (NCCL): one `batch_isend_irecv` per run of messages, coalesced into
  one launch; NCCL matches messages by order, which the schedule validator checks.
- `direct_transport` (gloo): each message straight to the process group's send/recv.
- `SharedMemoryTransport` (gloo, every pp rank on one host): a send copies the tensor into a
  slot of the receiver's inbox, a file in /dev/shm both map, and writes its slot id (two bytes) into a
  FIFO; a receive reads ids until its own and copies the slot out. On a CPU, each gloo message goes
  through loopback TCP and wakes two threads of the receiver (gloo's I/O loop, then the
  waiting one); this wakes only the waiting one and copies 3 times less code into cold
  caches. (The same idea as DeepSpeed's and oneCCL's shared-memory paths for CPU ranks.)
  Only the sender holds a FIFO's write end, so when it dies the kernel closes it and a
  receiver waiting on it wakes at once (`PeerLost`), as gloo's TCP would, instead of
  waiting out the group's timeout; a send to a dead receiver fails the same way.

`choose_transport("auto" | "shm" | "dist", ...)`: auto takes shared memory on gloo when
every pp peer can map this rank's inbox (same host, same /dev/shm, room for it), else the
process group; the choice is logged once.
"""

import ctypes
import logging
import mmap
import os
import secrets
import select
import socket
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from plait.common.compat import group_timeout_s
from plait.common.logs import log_once

log = logging.getLogger("plait")
TRANSPORTS = ("auto", "shm", "dist")
SHM_DIR = "/dev/shm"
AUTO_ROOM = 0.25  # auto takes shared memory only if a rank's inboxes fit in this share of /dev/shm's free space


class TransportError(RuntimeError):
    """A transport that cannot be set up as asked, explained in one sentence."""


class PeerLost(RuntimeError):
    """A pp peer closed its end of a shared-memory channel mid-run: it exited or was killed (its log says why)."""


class PeerTimeout(RuntimeError):
    """A shared-memory receive waited out the collective timeout: the sender is stuck, or far slower."""


def batched_transport(group: dist.ProcessGroup, peers: Sequence[int]) -> Callable:
    """NCCL: one `batch_isend_irecv` per run of messages (coalesced into one launch, no cross-wait deadlock)."""
    def post(recvs, sends) -> list:
        ops = [dist.P2POp(dist.irecv, buffer, peer, group, tag) for buffer, peer, tag in recvs]
        ops += [dist.P2POp(dist.isend, tensor.detach(), peer, group, tag) for tensor, peer, tag in sends]
        works = dist.batch_isend_irecv(ops)
        return works if len(works) == len(ops) else [works[-1]] * len(ops)  # NCCL: one handle for the batch
    return post


def direct_transport(group: dist.ProcessGroup, peers: Sequence[int]) -> Callable:
    """Gloo: each message straight to the process group's send/recv (no batching to gain, less Python per hop).

    The global peer ranks become ranks in `group` through a table built once from `peers`.
    """
    in_group = {peer: dist.get_group_rank(group, peer) for peer in peers}

    def post(recvs, sends) -> list:
        sent = [group.send([tensor], in_group[peer], tag) for tensor, peer, tag in sends]  # a peer may wait on these
        return [group.recv([buffer], in_group[peer], tag) for buffer, peer, tag in recvs] + sent
    return post


class _Sent:
    """A shared-memory send: complete once posted (the data is in the peer's inbox)."""
    __slots__ = ()

    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


SENT = _Sent()


class _Receive:
    """A shared-memory receive: `wait()` reads slot ids from the FIFO up to its own, then copies the slot out.

    It holds the buffer itself, not only its address, so the buffer lives until the copy.
    """
    __slots__ = ("inbox", "byte", "buffer", "source")

    def __init__(self, inbox: "_Inbox", byte: bytes, buffer: torch.Tensor, source: int):
        self.inbox, self.byte, self.buffer, self.source = inbox, byte, buffer, source

    def wait(self) -> bool:
        """Read the FIFO until this slot's byte; bytes of slots waited on later are remembered (a rank may
        take two messages from one peer in another order than they were sent, as under a V placement)."""
        inbox = self.inbox
        while self.byte not in inbox.arrived:
            try:
                byte = os.read(inbox.fifo, 2)
            except BlockingIOError:  # not sent yet: sleep in the kernel until it is
                byte = inbox.wait_byte()
            if not byte:  # end of file: no process holds the write end any more
                raise PeerLost(f"pipeline rank {inbox.peer} closed its end of the shared-memory channel while this "
                               f"rank waited for its message: it exited or was killed")
            if byte in inbox.arrived:
                raise TransportError(f"pipeline message from rank {inbox.peer} for slot byte {byte!r} arrived twice "
                                     f"before it was taken; the schedule's messages were broken")
            inbox.arrived.add(byte)
        inbox.arrived.remove(self.byte)
        ctypes.memmove(self.buffer.data_ptr(), self.source, inbox.slot_bytes)
        return True

    def is_completed(self) -> bool:
        return False


class _Inbox:
    """One direction between two ranks: the mapped slots and the FIFO (non-blocking) of one slot id (two bytes) per
    message. The receiver opens the FIFO to read, before the sender opens it to write (which needs a reader), so
    only the sender's process holds the write end."""

    def __init__(self, path: str, peer: int, slot_bytes: int, timeout_s: float, writer: bool = False):
        self.peer, self.slot_bytes, self.timeout_s = peer, slot_bytes, timeout_s
        self.arrived = set()  # slot bytes read from the FIFO whose receive has not been waited on yet
        fd = os.open(path + ".slots", os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        self.view = torch.frombuffer(self.map, dtype=torch.uint8)  # holds the mapping; its address is the slots'
        self.address = self.view.data_ptr()
        self.fifo = os.open(path + ".fifo", (os.O_WRONLY if writer else os.O_RDONLY) | os.O_NONBLOCK)
        self.poller = select.poll()
        self.poller.register(self.fifo, select.POLLIN)

    def wait_byte(self) -> bytes:
        """Block until the sender's next byte is in the FIFO, or its end closes (b''); at most the process group's
        timeout."""
        if not self.poller.poll(1000 * self.timeout_s):
            raise PeerTimeout(f"no pipeline message from rank {self.peer} in {self.timeout_s:.0f} s, the collective "
                              f"timeout")
        return os.read(self.fifo, 2)

    def close(self) -> None:
        if self.fifo >= 0:
            os.close(self.fifo)
            self.fifo = -1


def _slot_index(tag: int, microbatches: int, pp: int, vpp: int) -> int:
    """The slot of message `tag` in its receiver's inbox from one sender: (direction, micro-batch, sender's chunk).

    A tag is (direction * m + micro-batch) * (p v) + sending stage, and a sender holds stages
    r, r + p, ...: so 2 m v slots per sender hold every message it sends in one step.
    """
    rest, stage = divmod(tag, pp * vpp)
    return rest * vpp + stage // pp


class SharedMemoryTransport:
    """Pipeline messages between pp ranks on one host through /dev/shm: one inbox per neighbour that sends here.

    A send never blocks: every message of a step has its own slot, and a slot is written
    again only in a later step, after the receiver has copied it out (the sender starts
    that step only once its own step is over, which along the schedule comes after the
    receiver's take: a forward input is taken before the backward whose grad the sender
    waits for; a grad before the receiver's next step, whose forward the sender waits for;
    in evaluation, before the last stage's loss that every rank waits for). Message sizes
    are fixed at construction (`slot_bytes`, from the runtime's hidden shape and dtype).

    Construction is collective over `group`: each rank creates its inboxes, every peer opens
    them, and the files are unlinked once all are open, so nothing is left in /dev/shm even
    if a rank dies later. Raises TransportError (on every rank alike) when a peer cannot open
    an inbox or /dev/shm has no room.
    """

    def __init__(self, group: dist.ProcessGroup, rank: int, neighbours: Sequence[int], *, slot_bytes: int,
                 microbatches: int, pp: int, vpp: int, timeout_s: float = 1800.0, room: float = 1.0):
        self.slot_bytes, self.timeout_s, self.room = slot_bytes, timeout_s, room
        n_slots = 2 * microbatches * vpp
        self.offsets = [_slot_index(tag, microbatches, pp, vpp) * slot_bytes
                        for tag in range(2 * microbatches * pp * vpp)]  # tag -> byte offset in its inbox
        # each message's slot id, two bytes (written and read whole: a FIFO write under PIPE_BUF is atomic)
        self.bytes = [_slot_index(tag, microbatches, pp, vpp).to_bytes(2, "little") for tag in range(len(self.offsets))]
        self.inboxes: Dict[int, _Inbox] = {}  # sender's global rank -> inbox here
        self.outboxes: Dict[int, _Inbox] = {}  # receiver's global rank -> its inbox from here
        created, problem = self._create(rank, neighbours, n_slots * slot_bytes)
        everyone: List[Optional[Tuple[Dict[int, str], Optional[str]]]] = [None] * dist.get_world_size(group)
        names = {sender: os.path.basename(base) for sender, base in created.items()}
        dist.all_gather_object(everyone, (rank, names, problem), group=group)
        try:
            if problem is None:
                problem = self._open(rank, everyone)
            problems: List[Optional[str]] = [None] * len(everyone)
            dist.all_gather_object(problems, problem, group=group)
        finally:
            for base in created.values():  # everyone has opened them (or given up): nothing stays in /dev/shm
                _unlink(base)
        self.paths = [base + suffix for base in created.values() for suffix in (".slots", ".fifo")]  # all gone now
        dist.barrier(group=group)
        first = next((p for p in problems if p), None)
        if first:
            self.close()
            raise TransportError(first)

    def _create(self, rank: int, neighbours: Sequence[int], size: int) -> Tuple[Dict[int, str], Optional[str]]:
        """This rank's inbox files, one per neighbour (slots reserved with fallocate), or why they cannot be made."""
        created: Dict[int, str] = {}
        token = secrets.token_hex(8)
        try:
            stats = os.statvfs(SHM_DIR)
            free = stats.f_bavail * stats.f_frsize
            if size * len(neighbours) > self.room * free:
                return {}, (f"rank {rank}'s pipeline inboxes would take {size * len(neighbours) / 2**20:.0f} MiB, "
                            f"over {self.room:.0%} of the {free / 2**20:.0f} MiB free in {SHM_DIR}")
            for sender in neighbours:
                name = f"plait-pp-{token}-{sender}-to-{rank}"  # peers look it up in their own SHM_DIR
                base = created[sender] = os.path.join(SHM_DIR, name)
                fd = os.open(base + ".slots", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.posix_fallocate(fd, 0, max(size, 1))  # ENOSPC now, not SIGBUS at the first write
                finally:
                    os.close(fd)
                os.mkfifo(base + ".fifo", 0o600)
            for sender, base in created.items():
                self.inboxes[sender] = _Inbox(base, sender, self.slot_bytes, self.timeout_s)
        except OSError as error:
            for base in created.values():
                _unlink(base)
            return {}, f"rank {rank} could not make its {size}-byte pipeline inboxes in {SHM_DIR}: {error.strerror}"
        return created, None

    def _open(self, rank: int, everyone) -> Optional[str]:
        """Open the inbox each neighbour made for this rank; None, or why not (another host, another /dev/shm)."""
        for owner, created, problem in everyone:
            if problem:
                return problem
            if rank in created:
                try:
                    self.outboxes[owner] = _Inbox(os.path.join(SHM_DIR, created[rank]), owner, self.slot_bytes,
                                                  self.timeout_s, writer=True)
                except OSError as error:
                    return (f"rank {rank} on {socket.gethostname()} cannot open rank {owner}'s pipeline inbox in "
                            f"{SHM_DIR} ({error.strerror}): the ranks do not share one host's shared memory")
        return None

    def post(self, recvs, sends) -> list:
        """Sends land in the peers' inboxes now; receives are handles that copy their slot out when waited on."""
        offsets, slot_bytes, write, memmove = self.offsets, self.slot_bytes, os.write, ctypes.memmove
        for tensor, peer, tag in sends:
            if tensor.nbytes != slot_bytes or not tensor.is_contiguous():
                raise TransportError(f"a pipeline message of shape {tuple(tensor.shape)} and dtype {tensor.dtype} "
                                     f"does not fill the {slot_bytes}-byte slot sized from the runtime's "
                                     f"hidden_shape and dtype (or is not contiguous); pass the chunks' real output "
                                     f"shape and dtype")
            outbox = self.outboxes[peer]
            memmove(outbox.address + offsets[tag], tensor.data_ptr(), slot_bytes)
            try:
                write(outbox.fifo, self.bytes[tag])
            except BrokenPipeError:  # no reader left
                raise PeerLost(f"pipeline rank {peer} closed its end of the shared-memory channel before this rank's "
                               f"message reached it: it exited or was killed") from None
        received = [_Receive(self.inboxes[peer], self.bytes[tag], buffer, self.inboxes[peer].address + offsets[tag])
                    for buffer, peer, tag in recvs]
        return received + [SENT] * len(sends)

    __call__ = post  # the runtime calls a transport as `post`; this one also has `set_timeout`

    def set_timeout(self, seconds: float) -> None:
        """A receive fails after `seconds` without its message from now on (`parallel.train_timeout_s`)."""
        self.timeout_s = seconds
        for inbox in self.inboxes.values():
            inbox.timeout_s = seconds

    def close(self) -> None:
        """Close the FIFOs (the mappings go with the last reference to this transport)."""
        for inbox in list(self.inboxes.values()) + list(self.outboxes.values()):
            inbox.close()

    def __del__(self):
        self.close()


def _unlink(base: str) -> None:
    for suffix in (".slots", ".fifo"):
        try:
            os.unlink(base + suffix)
        except FileNotFoundError:
            pass


def choose_transport(requested: str, group: dist.ProcessGroup, backend: str, rank: int, peers: Sequence[int], *,
                     slot_bytes: int, microbatches: int, pp: int, vpp: int,
                     device: torch.device = torch.device("cpu")) -> Tuple[Callable, str]:
    """The `post` function for `requested` (auto | shm | dist) and the name of what was chosen, logged once.

    `peers` are the pp group's global ranks in pp order from this rank ([0] is this rank);
    `device` is where the messages live (shared memory needs them in host memory).
    auto: shared memory on gloo where every peer can map this rank's inbox and the inboxes
    take at most a quarter of /dev/shm's free space, else the process group (batched on
    NCCL, direct on gloo). shm where it cannot work raises TransportError naming the setting.
    """
    if requested not in TRANSPORTS:
        raise TransportError(f"parallel.pp_transport={requested} is not one of {', '.join(TRANSPORTS)}.")
    reason = "asked for" if requested == "dist" else ""
    if requested != "dist":
        if backend != "gloo" or device.type != "cpu":
            reason = f"shared memory carries host tensors over gloo, not {device.type} tensors over {backend}"
        else:  # collective: every rank takes part and all agree on the outcome
            neighbours = sorted(set([peers[-1], peers[1 % len(peers)]]) - {rank})
            try:
                transport = SharedMemoryTransport(group, rank, neighbours, slot_bytes=slot_bytes,
                                                  microbatches=microbatches, pp=pp, vpp=vpp,
                                                  timeout_s=group_timeout_s(group),
                                                  room=AUTO_ROOM if requested == "auto" else 1.0)
                log_once("pipeline messages: shared memory (every pp rank on one host)")
                return transport, "shm"
            except TransportError as error:
                reason = str(error)
        if requested == "shm":
            raise TransportError(f"parallel.pp_transport=shm cannot run here: {reason}; "
                                 "use parallel.pp_transport=auto.")
    make = batched_transport if backend == "nccl" else direct_transport
    log_once(f"pipeline messages: {backend} send/recv ({reason})" if reason else f"pipeline messages: {backend}")
    return make(group, peers), "dist"


