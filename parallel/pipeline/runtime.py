"""The pipeline runtime: one rank walks its action list and runs its chunks.

What moves where:
- F(mb, s): the chunk of stage s runs `chunk(x)` on micro-batch mb's input (token ids on
  stage 0, else the hidden states received from stage s - 1). The last stage turns the
  output into the micro-batch's loss; its backward starts from an output grad of 1/m, so
  the accumulated grads are the grads of the step's mean loss. Other stages keep (input,
  output) for the backward.
- B(mb, s): backward from the loss (last stage) or from the received grad of the output;
  the grad of the input is then sent to stage s - 1. Grads accumulate in `.grad` over the
  micro-batches.
- I(mb, s) and W(mb, s), the backward split for zero-bubble schedules (`split_backward.py`):
  I computes and sends the input's grad and keeps what W needs; W later accumulates the
  weight grads from it, with no second forward.
- Where two consecutive stages share a rank (the V placement), the output is handed over
  as the next stage's input (detached, a grad-requiring leaf) and its grad handed back,
  with no message.
- Each run of consecutive SEND/RECV actions is posted at once through the transport chosen
  at construction (`transport.py`): on NCCL as one `batch_isend_irecv` (coalesced); on gloo
  through shared memory when every pp rank is on this host, else straight to the process
  group's send/recv. Off NCCL the sends leave first (a peer may be waiting on them; the
  receives are posted a compute ahead and nobody waits on them yet). A receive is waited on
  only when the compute that needs it starts; a gloo send is waited on only once the
  schedule proves the peer has posted the receive (a later message from that peer has
  arrived), so a wait never stalls (a shared-memory send is complete once posted). Then a
  sent output's data is freed, keeping only its autograd node (Megatron's
  deallocate_output_tensor): the output is not held until its backward. This assumes a
  chunk's last op does not save its own output (true for a residual add); pass
  `free_sent_outputs=False` otherwise.
- Nothing of a micro-batch outlives its backward, so a rank holds the activations of at
  most p micro-batches under 1F1B (p - r on rank r) and m under GPipe.

Receives are pre-sized from `hidden_shape` ([micro_batch, seq (/tp under sequence
parallelism), dim]); the message tag names (direction, micro-batch, sending stage), which
gloo matches on; NCCL and shared memory match by order instead, which the validator checks
(every pair of ranks posts its sends and receives in the same order).
"""

import contextlib
import logging
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from plait.common.compat import run_backward
from plait.common.logs import log_once
from plait.parallel.grid import Grid
from plait.parallel.pipeline.schedule import (Action, Kind, build_schedule, local_stages, matching_recv, matching_send,
                                              placement, schedule_name, stage_ranks)
from plait.parallel.pipeline.simulate import validate
from plait.parallel.pipeline.split_backward import backward_input, backward_weight
from plait.parallel.pipeline.transport import choose_transport, direct_transport

log = logging.getLogger("plait")
COMM = (Kind.SEND_F, Kind.SEND_B, Kind.RECV_F, Kind.RECV_B)
RECV = (Kind.RECV_F, Kind.RECV_B)


class Receive(NamedTuple):
    """A RECV action resolved once: which compute reads it, from whom, and how it is matched."""
    key: tuple          # (is_forward, micro-batch, stage) of the compute that waits for it
    peer: int           # global rank of the sender
    tag: int
    wants_grad: bool    # a forward input while training: the buffer is allocated as a grad-requiring leaf
    peer_pp: int        # the sender's pp rank and the index of its matching send: once this
    position: int       # message arrived, every action before that index on the peer has run


class Send(NamedTuple):
    """A SEND action resolved once: which tensor goes where."""
    key: Tuple[int, int]  # (micro-batch, stage) of the output sent (SEND_F) or of the input whose grad is sent
    is_output: bool       # SEND_F: the data is freed once the peer surely has it
    peer: int
    tag: int
    peer_pp: int          # the receiver's pp rank and the index of its matching receive
    position: int


def message_tag(send: Action, microbatches: int, n_stages: int) -> int:
    """The tag of the message a send starts: (direction, micro-batch, sending stage), the same on both ends."""
    direction = 0 if send.kind == Kind.SEND_F else 1
    return (direction * microbatches + send.microbatch) * n_stages + send.stage


def default_prefetch(backend: str) -> int:
    """How many computes ahead receives are posted: 1 on gloo, 0 on NCCL (chosen once, logged once).

    Gloo moves data only once the receive is posted, so a receive posted right before its
    compute adds a round trip to every hop; posted one compute ahead, the data arrives while
    that compute runs. NCCL keeps Megatron's order (receive posted with the previous sends).
    """
    prefetch = 0 if backend == "nccl" else 1
    log_once(f"pipeline: {backend} backend, receives posted {prefetch} compute(s) ahead")
    return prefetch


class PipelineRuntime:
    """Runs one pp rank's chunks through a schedule: `run(...)` does one step's forwards and backwards.

    `chunks` are this rank's modules in model order (stages r, r + p, ...); each is called
    as `chunk(x)`, so wrappers and hooks on them work. `loss_fn(output, target)` gives the
    mean loss of one micro-batch on the last stage.

    The action lists are resolved at construction into plans: each step a method and
    its arguments (peers, tags, matching positions, buffer keys all worked out), so the
    loop between two computes does no schedule lookups: every call there is on the critical
    path, and on CPU, after a compute, runs from cold caches.
    """

    def __init__(self, chunks: Sequence[nn.Module], grid: Grid, *, schedule: str, vpp: int, microbatches: int,
                 hidden_shape: Sequence[int], dtype: torch.dtype = torch.float32,
                 free_sent_outputs: bool = True, prefetch: Optional[int] = None, transport: str = "auto"):
        self.grid, self.pp, self.vpp, self.microbatches = grid, grid.pp, vpp, microbatches
        self.n_stages = grid.pp * vpp
        self.schedule = schedule_name(schedule, vpp)
        style = placement(self.schedule)
        self.stage_rank = stage_ranks(grid.pp, vpp, style)  # stage -> pp rank
        stages = local_stages(grid.pp_rank, grid.pp, vpp, style)
        if len(chunks) != len(stages):
            raise ValueError(f"pp rank {grid.pp_rank} holds stages {stages} but got {len(chunks)} chunks")
        self.chunk_of: Dict[int, nn.Module] = dict(zip(stages, chunks))
        self.chunk_index: Dict[int, int] = {stage: index for index, stage in enumerate(stages)}
        self.holds_last_stage = self.stage_rank[-1] == grid.pp_rank
        self.prefetch = default_prefetch(grid.backend) if prefetch is None else prefetch
        all_train = build_schedule(self.schedule, grid.pp, vpp, microbatches, prefetch=self.prefetch)
        all_eval = build_schedule(self.schedule, grid.pp, vpp, microbatches, forward_only=True,
                                  prefetch=self.prefetch)
        validate(all_train, grid.pp, vpp, microbatches, style=style)
        validate(all_eval, grid.pp, vpp, microbatches, forward_only=True, style=style)
        self.splits_backward = any(a.kind == Kind.W for a in all_train[grid.pp_rank])
        self.hidden_shape, self.dtype = tuple(hidden_shape), dtype
        self.placeholders, self.loss_grads = {}, {}
        self.device = grid.device
        self.free_sent_outputs = free_sent_outputs
        self.global_rank = [grid.peer(pp=r) for r in range(grid.pp)]  # pp rank -> global rank
        self.transport_name = "none"
        if grid.pp_group is not None:  # the transport, chosen once
            self.pp_ranks = [grid.pp_peer(offset) for offset in range(grid.pp)]  # [0] is this rank
            slot_bytes = torch.Size(self.hidden_shape).numel() * dtype.itemsize
            self.transport, self.transport_name = choose_transport(
                transport, grid.pp_group, grid.backend, grid.rank, self.pp_ranks, slot_bytes=slot_bytes,
                microbatches=microbatches, pp=grid.pp, vpp=vpp, device=grid.device)
            self.loss_transport = (self.transport if self.transport_name == "dist"
                                   else direct_transport(grid.pp_group, self.pp_ranks))
        self.last_stage_rank = self.global_rank[self.stage_rank[-1]]
        # gloo: the loss travels as messages in the background (the other ranks post its receive
        # at the start, the last stage sends it once its own computes are done); NCCL: a broadcast
        # at the end (a receive posted early would hold up the stream the pipeline's messages share)
        self.early_loss = grid.pp_group is not None and grid.backend != "nccl"
        self.loss_tag = 2 * microbatches * self.n_stages  # past every activation and grad message's tag
        self.plans = {False: self._plan(all_train, forward_only=False), True: self._plan(all_eval, forward_only=True)}
        if grid.pp_group is not None:
            dist.barrier(group=grid.pp_group)  # NCCL: set the communicator up with every rank present

    # the plan --------------------------------------------------------------------
    def _plan(self, all_actions: Sequence[Sequence[Action]], forward_only: bool) -> List[tuple]:
        """This rank's actions as (function, args) steps, run as `function(self, *args)`; each run of consecutive
        SEND/RECV actions is one post (`_post_together` on NCCL, else `_post_sends_first`). Plain functions, not
        bound methods: a plan holding `self` would make the runtime a reference cycle, freed (with its process
        group) only by the garbage collector or at exit."""
        actions = all_actions[self.grid.pp_rank]
        index_of = [{action: i for i, action in enumerate(rank_actions)} for rank_actions in all_actions]
        last_backward = {action.stage: i for i, action in enumerate(actions) if action.kind in (Kind.B, Kind.W)}
        here = self.grid.pp_rank
        plan, index = [], 0
        post = PipelineRuntime._post_together if self.grid.backend == "nccl" else PipelineRuntime._post_sends_first
        while index < len(actions):
            action = actions[index]
            if action.kind in COMM:
                end = index
                while end < len(actions) and actions[end].kind in COMM:
                    end += 1
                batch = actions[index:end]
                receives = tuple(self._receive(a, index_of, forward_only) for a in batch if a.kind in RECV)
                sends = tuple(self._send(a, index_of) for a in batch if a.kind not in RECV)
                plan.append((post, (receives, sends)))
                index = end
                continue
            mb, stage = action.microbatch, action.stage
            last_of_chunk = self.chunk_index[stage] if last_backward.get(stage) == index else None
            hand_over = stage < self.n_stages - 1 and self.stage_rank[stage + 1] == here
            hand_back = stage > 0 and self.stage_rank[stage - 1] == here
            received = (False, mb, stage) if stage < self.n_stages - 1 else None
            if action.kind == Kind.F:
                plan.append((PipelineRuntime._forward, (mb, stage, (True, mb, stage) if stage > 0 else None, hand_over)))
            elif action.kind == Kind.B:
                plan.append((PipelineRuntime._backward, (mb, stage, received, last_of_chunk, hand_back)))
            elif action.kind == Kind.I:
                plan.append((PipelineRuntime._backward_input, (mb, stage, received, hand_back)))
            else:
                plan.append((PipelineRuntime._backward_weight, (mb, stage, self.chunk_index[stage], last_of_chunk)))
            index += 1
        return plan

    def _receive(self, action: Action, index_of, forward_only: bool) -> Receive:
        send = matching_send(action)
        peer_pp = self.stage_rank[send.stage]
        forward = action.kind == Kind.RECV_F
        return Receive((forward, action.microbatch, action.stage), self.global_rank[peer_pp],
                       message_tag(send, self.microbatches, self.n_stages), forward and not forward_only,
                       peer_pp, index_of[peer_pp][send])

    def _send(self, action: Action, index_of) -> Send:
        receive = matching_recv(action)
        peer_pp = self.stage_rank[receive.stage]
        forward = action.kind == Kind.SEND_F
        return Send((action.microbatch, action.stage), forward, self.global_rank[peer_pp],
                    message_tag(action, self.microbatches, self.n_stages), peer_pp, index_of[peer_pp][receive])

    # communication ---------------------------------------------------------------
    def _post_together(self, receives: Sequence[Receive], sends: Sequence[Send]) -> None:
        """NCCL: one run of communication actions as one batch (coalesced: a send and a receive between two
        ranks cannot hold each other up), so the receive buffers are allocated first."""
        buffers = [self._buffer(r) for r in receives]
        tensors = [self.outputs[s.key] if s.is_output else self.input_grads.pop(s.key) for s in sends]
        works = self.transport([(b, r.peer, r.tag) for b, r in zip(buffers, receives)],
                               [(t, s.peer, s.tag) for t, s in zip(tensors, sends)])
        self._track(receives, buffers, works, sends, tensors, works[len(receives):])

    def _post_sends_first(self, receives: Sequence[Receive], sends: Sequence[Send]) -> None:
        """Gloo and shared memory: the sends leave before the receive buffers are even allocated (a peer may be
        waiting on a send; the receives are posted a compute ahead and nobody waits on them yet)."""
        tensors = [self.outputs[s.key] if s.is_output else self.input_grads.pop(s.key) for s in sends]
        sent = self.transport((), [(t, s.peer, s.tag) for t, s in zip(tensors, sends)]) if sends else ()
        buffers = [self._buffer(r) for r in receives]
        works = self.transport([(b, r.peer, r.tag) for b, r in zip(buffers, receives)], ()) if receives else ()
        self._track(receives, buffers, works, sends, tensors, sent)

    def _buffer(self, receive: Receive) -> torch.Tensor:
        """A receive buffer from `hidden_shape`; a forward input while training is a grad-requiring leaf."""
        return torch.empty(self.hidden_shape, dtype=self.dtype, device=self.device, requires_grad=receive.wants_grad)

    def _track(self, receives, buffers, receive_works, sends, tensors, send_works) -> None:
        """Remember posted receives (for their computes) and sends in flight (freed once complete)."""
        for receive, buffer, work in zip(receives, buffers, receive_works):
            self.received[receive.key] = (work, buffer, receive)
        for send, tensor, work in zip(sends, tensors, send_works):
            self.in_flight.append((work, send, tensor))

    def _take(self, key: tuple) -> torch.Tensor:
        """A tensor handed over on this rank, or wait for a receive (the peer has now passed the send, so every
        receive it posted before is posted)."""
        if key in self.handed:
            return self.handed.pop(key)
        work, buffer, receive = self.received.pop(key)
        work.wait()
        progress = self.peer_progress
        progress[receive.peer_pp] = max(progress[receive.peer_pp], receive.position)
        return buffer

    def _release_sent(self, wait_all: bool = False) -> None:
        """Drop finished sends and free the data of sent outputs (their autograd nodes stay).

        A send is waited on only where its receive is known to be posted, so waiting never
        stalls: when a message from the peer arrived that the peer sent after posting that
        receive (`peer_progress`, from the plan's positions), or at the end of the step.
        Gloo reports a send complete only once waited on; NCCL also reports it when polled.
        """
        if not self.in_flight:
            return
        still = []
        for work, send, tensor in self.in_flight:
            if wait_all or send.position < self.peer_progress[send.peer_pp]:
                work.wait()
            elif not work.is_completed():
                still.append((work, send, tensor))
                continue
            if send.is_output and self.free_sent_outputs and not tensor.is_leaf:  # is_leaf: no autograd node
                tensor.data = self._placeholder(tensor.dtype)
        self.in_flight = still
        if still:
            unfreed = sum(1 for _, send, _ in still if send.is_output)
            self.peak_unfreed_outputs = max(self.peak_unfreed_outputs, unfreed)

    def _placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        """An empty tensor of `dtype` on this rank's device (one per dtype, shared) to swap a freed output's data for."""
        if dtype not in self.placeholders:
            self.placeholders[dtype] = torch.empty(0, dtype=dtype, device=self.device)
        return self.placeholders[dtype]

    def _loss_grad(self, loss: torch.Tensor) -> torch.Tensor:
        """The output grad of a micro-batch's loss, 1/m (so grads add up to the grad of the mean) times the
        loss scale, built once per scale."""
        key = (loss.dtype, loss.device, self.loss_scale)
        if key not in self.loss_grads:
            self.loss_grads[key] = torch.full((), self.loss_scale / self.microbatches, dtype=loss.dtype,
                                              device=loss.device)
        return self.loss_grads[key]

    # compute ---------------------------------------------------------------------
    def _forward(self, mb: int, stage: int, received: Optional[tuple], hand_over: bool) -> None:
        """F(mb, stage): from the token ids (stage 0) or the received hidden states (a grad-requiring leaf)."""
        x = self.step_inputs[mb] if received is None else self._take(received)
        self._release_sent()
        with self.forward_context():
            output = self.chunk_of[stage](x, **self.step_kwargs[mb])
        if stage == self.n_stages - 1:
            output = self.loss_fn(output, self.step_targets[mb])  # backward scales it by 1/m (`_loss_grad`)
            self.losses.append(output.detach())
        if hand_over:  # the next stage is on this rank: its input is this output, cut from this graph
            self.handed[(True, mb, stage + 1)] = output.detach().requires_grad_(torch.is_grad_enabled())
        if (stage < self.n_stages - 1 and not hand_over) or torch.is_grad_enabled():
            self.outputs[(mb, stage)] = output  # to send, and (with grad) to backward from
        if received is not None and torch.is_grad_enabled():
            self.inputs[(mb, stage)] = x

    def _start_backward(self, mb: int, stage: int, received: Optional[tuple]):
        """The output to backward from and its grad (the loss's 1/m on the last stage, else received or handed)."""
        output = self.outputs.pop((mb, stage))
        grad = self._loss_grad(output) if received is None else self._take(received)
        self._release_sent()  # after the take: this output's send is certainly received now, its data freed
        return output, grad

    def _keep_input_grad(self, mb: int, stage: int, x: Optional[torch.Tensor], hand_back: bool) -> None:
        """The input's grad, to send to stage - 1, or to hand back to it on this rank."""
        if hand_back:
            self.handed[(False, mb, stage - 1)] = x.grad
        elif stage > 0:
            self.input_grads[(mb, stage)] = x.grad

    def _backward(self, mb: int, stage: int, received: Optional[tuple], last_of_chunk: Optional[int],
                  hand_back: bool) -> None:
        """B(mb, stage): from the loss (last stage) or the received output grad; keeps the input's grad to send."""
        if last_of_chunk is not None and self.before_last_backward is not None:
            self.before_last_backward(last_of_chunk)
        output, grad = self._start_backward(mb, stage, received)
        run_backward(output, grad)  # the engine itself: `output`'s data may be freed already
        self._keep_input_grad(mb, stage, self.inputs.pop((mb, stage), None), hand_back)

    def _backward_input(self, mb: int, stage: int, received: Optional[tuple], hand_back: bool) -> None:
        """I(mb, stage): only the input's grad (kept to send); what the weight grads need waits for W."""
        output, grad = self._start_backward(mb, stage, received)
        x = self.inputs.pop((mb, stage), None)
        self.pending_weights[(mb, stage)] = backward_input(output, grad, [x])
        self._keep_input_grad(mb, stage, x, hand_back)

    def _backward_weight(self, mb: int, stage: int, chunk_index: int, last_of_chunk: Optional[int]) -> None:
        """W(mb, stage): the weight grads of a micro-batch whose I has run; grads accumulate in `.grad`."""
        if last_of_chunk is not None and self.before_last_backward is not None:
            self.before_last_backward(last_of_chunk)
        backward_weight(self.pending_weights.pop((mb, stage)))
        if self.after_weights is not None:
            self.after_weights(chunk_index)

    # the step ----------------------------------------------------------------------
    def set_timeout(self, seconds: float) -> None:
        """Shared-memory receives fail after `seconds` from now on (the process groups carry their own)."""
        set_timeout = getattr(getattr(self, "transport", None), "set_timeout", None)  # (shm only; none at pp 1)
        if set_timeout is not None:
            set_timeout(seconds)

    def run(self, inputs, targets, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
            before_last_backward: Optional[Callable[[int], None]] = None,
            after_weights: Optional[Callable[[int], None]] = None,
            forward_context: Callable = contextlib.nullcontext, forward_only: bool = False,
            loss_scale: float = 1.0, chunk_kwargs: Optional[Sequence[Dict[str, Any]]] = None) -> torch.Tensor:
        """One step over `microbatches` micro-batches; returns the mean loss on every pp rank.

        `inputs[mb]` is read on the first stage and `targets[mb]` on the last; every stage's chunk forward also
        takes `chunk_kwargs[mb]` (the micro-batch's document numbers, for a document mask), if given.
        `before_last_backward(chunk_index)` runs right before each chunk's last backward.
        `after_weights(chunk_index)` runs after each W (a split backward's weight grads of one micro-batch
        are in `.grad`): for reducers whose hooks fired at I, before those grads existed (FSDP2's).
        With `forward_only` (evaluation, call under torch.no_grad) only the forwards run. The grads come out
        multiplied by `loss_scale` (fp16's: the loss's grad is seeded with it; the returned loss is not scaled).
        """
        self.loss_scale = loss_scale
        self.step_inputs, self.step_targets, self.loss_fn = inputs, targets, loss_fn  # this step's, read by the steps
        self.step_kwargs = chunk_kwargs if chunk_kwargs is not None else [{}] * self.microbatches
        self.before_last_backward, self.after_weights = before_last_backward, after_weights
        self.forward_context = forward_context
        self.outputs: Dict[Tuple[int, int], torch.Tensor] = {}
        self.inputs: Dict[Tuple[int, int], torch.Tensor] = {}
        self.input_grads: Dict[Tuple[int, int], torch.Tensor] = {}
        self.received: Dict[tuple, tuple] = {}
        self.handed: Dict[tuple, torch.Tensor] = {}  # (is_forward, mb, stage) -> a tensor passed on this rank
        self.pending_weights: Dict[Tuple[int, int], object] = {}  # (mb, stage) -> what I left for W
        self.in_flight: List[tuple] = []
        self.peer_progress: List[int] = [-1] * self.pp
        self.peak_unfreed_outputs = 0
        self.losses: List[torch.Tensor] = []  # the last stage's micro-batch losses
        self.loss, self.loss_works = None, []
        if self.early_loss and not self.holds_last_stage:  # the last stage's loss lands here in the background
            self.loss = torch.zeros((), device=self.device)
            self.loss_works = self.loss_transport([(self.loss, self.last_stage_rank, self.loss_tag)], [])
        for step, args in self.plans[forward_only]:
            step(self, *args)
        if self.early_loss and self.holds_last_stage:
            self._share_loss(self._mean_loss())
        self._release_sent(wait_all=True)
        self.outputs.clear()
        self.handed.clear()
        self.step_inputs = self.step_targets = self.loss_fn = self.step_kwargs = None
        return self._broadcast_loss()

    def _mean_loss(self) -> torch.Tensor:
        return torch.stack(self.losses).float().sum() / self.microbatches

    def _share_loss(self, loss: torch.Tensor) -> None:
        """Gloo, last stage, once its own computes are done: send the step's loss to every other pp rank.

        Not right after the last loss: in training the last stage's next compute is then on the
        critical path (the drain starts there), while after its last backward it idles as the
        other ranks finish theirs, so the messages cost nobody time and arrive before those end.
        """
        self.loss = loss
        self.loss_works = self.loss_transport([], [(loss, peer, self.loss_tag) for peer in self.pp_ranks[1:]])

    def _broadcast_loss(self) -> torch.Tensor:
        """The last stage's loss, made known to every rank of the pp group."""
        if self.early_loss:  # its messages were posted during the step
            for work in self.loss_works:
                work.wait()
            return self.loss
        loss = self._mean_loss() if self.losses else torch.zeros((), device=self.device)
        if self.grid.pp_group is not None:
            dist.broadcast(loss, src=self.last_stage_rank, group=self.grid.pp_group)
        return loss
