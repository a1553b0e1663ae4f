"""The training loop as a library: `Trainer(cfg).step()` runs one optimizer step.

The trainer builds, in order: the process environment and group, the validated layout,
the grid, the model (this rank's chunks), the optimizer, the loader and the metric sinks.
`plait-train` is a thin loop over `fit()`; a custom loop can call `step()` and
`evaluate()` itself, or build the pieces directly from `plait.parallel`, `plait.optim`
and `plait.data`.
"""

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.profiler import record_function
from omegaconf import OmegaConf

from plait.data.documents import document_ids
from plait.data.errors import DataError
from plait.data.loader import Loader
from plait.data.rampup import BatchRamp
from plait.launch.env import ProcessEnv, detect, init_process_group, pick_device
from plait.launch.faults import crash, fault_step
from plait.launch.rundir import resolve_run_dir
from plait.launch.signals import Interrupted, Preempted, PreemptionFlag
from plait.common.compat import process_groups, set_group_timeout
from plait.common.optimizer_state import state_bytes
from plait.common.precision import float8_gemms
from plait.optim.builder import build_optimizer, make_optimizer
from plait.optim.muon import NS_DTYPES
from plait.optim.groups import param_groups
from plait.optim.clip import clip_by_norm
from plait.optim.loss_scale import LossScaler
from plait.parallel.column_overlap import overlap_wanted
from plait.parallel.float8 import check_float8_device
from plait.parallel.grad_norm import global_grad_norm
from plait.optim.schedule import apply_lr
from plait.parallel.data_parallel import DataParallelGrads
from plait.parallel.grid import Grid
from plait.parallel.sharding import ShardSpec
from plait.parallel.context import split_sequence
from plait.parallel.pipeline.runtime import PipelineRuntime
from plait.parallel.pipeline.schedule import (chunks_per_rank, microbatch_groups, placement, schedule_name,
                                              splits_backward, stage_ranks)
from plait.parallel.tied import TiedWeights
from plait.parallel.tensor import all_reduce_coalesced
from plait.parallel.fsdp import FSDP_LEVELS, ShardedGrads, local
from plait.parallel.matrices import ExpertSplitMatrices, ShardedMatrices
from plait.parallel.shard_optimizer import ShardOptimizer
from plait.parallel.zero import ZeroOptimizer
from plait.train import reshard
from plait.train.checkpoint import INDEX, decode_bytes, encode_bytes, layout_meta, model_meta, writer_ranks
from plait.train.checkpointer import Checkpointer, TrainerState, checkpoint_root, due, resume_target
from plait.train import metrics as metrics_lib
from plait.train.profile import StepProfiler
from plait.train.config import Config, compile_wanted, micro_batch_size, to_yaml, validate
from plait.train.export import init_from_hf
from plait.train.build import build_chunks, hidden_shape, named_parameters_of, param_specs_of
from plait.train.model import Transformer, tied_names
from plait.train.moe import expert_biases, max_violation, moe_layers, step_loads, take_balance, update_expert_bias
from plait.train.mtp import future_tokens, take_losses
from plait.train.parametrization import build_parametrization, zero_queries
from plait.train.peaks import peak_flops
from plait.train.step import autocast

log = logging.getLogger("plait")


def all_reduce_mean(value: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(value, group=group)
        value /= dist.get_world_size(group)
    return value


class Trainer:
    """Builds everything a run needs from a composed config; `step()` trains one step."""

    def __init__(self, cfg: Config, env: Optional[ProcessEnv] = None):
        self.started = time.monotonic()  # train.max_minutes counts from here
        self.cfg = cfg
        self.env = env or detect()
        validate(cfg, self.env.world_size)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        self.device = pick_device(cfg.train.device, self.env.local_rank)
        if float8_gemms(cfg.train.precision):
            check_float8_device(self.device)
        init_process_group(self.env, self.device, cfg.parallel.backend, timeout_s=int(cfg.parallel.timeout_s))
        self.grid = Grid.build(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp, self.device, cp=cfg.parallel.cp,
                               ep=cfg.parallel.ep)
        self.is_logger = self.grid.rank == 0
        self.micro_batch = micro_batch_size(cfg, self.grid.dp)
        torch.manual_seed(cfg.train.seed)
        # the schedule's builder name (pp == 1: forward and backward of each micro-batch in turn, whatever is set)
        self.schedule = schedule_name(cfg.parallel.schedule, cfg.parallel.vpp) if self.grid.pp > 1 else "1f1b"
        self.chunks = self._build_chunks()  # this rank's model chunks (one unless pp > 1)
        for chunk in self.chunks:
            chunk.loss_chunks = int(cfg.train.loss_chunks) if chunk.has_head else 0
            chunk.z_loss = float(cfg.train.z_loss) if chunk.has_head else 0.0
        # tied embeddings under a pipeline: the last stage's head copy ({copy: embedding}) and their grad sum
        self.mirrors = {name: source for chunk in self.chunks for name, source in chunk.tied_copies().items()}
        self.tied = self._build_tied()  # None unless tied and pp > 1
        self.offload = self._build_offload(self.chunks)  # None unless offload.backend is set
        self.model = self.chunks[0] if self.grid.pp == 1 else torch.nn.ModuleList(self.chunks)
        self.specs = param_specs_of(self.chunks)
        self.moe_layers = moe_layers(self.chunks)
        self.mtp = next((chunk.mtp for chunk in self.chunks if chunk.mtp is not None), None)  # multi-token prediction
        self.grads = self._build_grads()  # before the names: under ZeRO-2/3 FSDP2 swaps in sharded parameters
        self.named_params = dict(named_parameters_of(self.chunks))  # global names, unique across chunks
        group_of = self.parametrization.group_of  # muP's (or the standard) per-name groups; a tied copy's is
        self.param_group_of = lambda name, param: group_of(self.mirrors.get(name, name), param)  # its source's
        self.grads_sharded_over_dp = cfg.parallel.zero == 1 or self.fsdp  # ZeRO: each dp rank holds a piece of every grad
        self.optimizer, self.grad_entries = self._build_optimizer()
        self.loss_scaler = LossScaler.from_config(cfg.train) if cfg.train.precision == "fp16" else None
        if self.loss_scaler is not None and self.is_logger:
            scaler = self.loss_scaler
            log.info("fp16: loss scale %s", f"dynamic from {scaler.scale:g} (x2 after {scaler.window} steps without "
                     f"an overflow, /2 from the {scaler.hysteresis}th overflow on)" if scaler.dynamic
                     else f"static {scaler.scale:g}")
        self._log_layout()
        self.ramp = (BatchRamp.from_setting(cfg.train.rampup_batch_size, cfg.train.batch_size)
                     if cfg.train.rampup_batch_size is not None else None)
        if self.ramp is not None and self.is_logger:
            log.info("data: %s", self.ramp.describe())
        self.loader = self._build_loader()
        self.document_eos = self._document_eos()  # None: plain causal attention
        self.run_dir = resolve_run_dir(cfg, self.grid)
        self.profiler = StepProfiler.from_setting(cfg.train.profile_steps, self.run_dir / "profile", self.grid.rank,
                                                  self.device)
        self.step_num = 0
        self.flops_per_token = metrics_lib.flops_per_token(cfg.model, cfg.train.seq_len)
        self.peak_flops, peak_source = peak_flops(self.device, cfg.train.precision, cfg.train.peak_flops)
        if self.is_logger:
            log.info("mfu: against %.1f TFLOP/s per device (%s)", self.peak_flops / 1e12, peak_source)
        new_run_dir = not self.run_dir.exists()
        try:
            self._start_run()
        except BaseException:  # a run that fails at start leaves no run directory behind
            if hasattr(self, "sink"):
                self.sink.close()
            if self.is_logger and new_run_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def _start_run(self) -> None:
        """Open the run directory and its sinks, build the step, resume or initialize the weights."""
        cfg = self.cfg
        self.sink = metrics_lib.MetricsSink(
            self.run_dir, cfg.train.steps, self.is_logger, cfg.train.progress, cfg.logging.wandb,
            cfg.logging.tensorboard, OmegaConf.to_container(cfg, resolve=True) if self.is_logger else None)
        if self.is_logger:
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.compile, why = compile_wanted(cfg.train.compile, self.device.type, cfg.offload.backend,
                                           splits_backward(cfg.parallel))
        if self.is_logger:
            log.info("compile: %s (%s)", "on" if self.compile else "off", why)
        self.modules = [torch.compile(chunk) for chunk in self.chunks] if self.compile else self.chunks
        self.pipeline = self._build_pipeline(cfg.parallel.microbatches)  # every layout's step, pp == 1 included
        self.ramp_pipeline: Optional[PipelineRuntime] = None  # a step's while the batch ramps up (fewer micro-batches)
        if cfg.parallel.overlap_param_gather:  # (validated: ZeRO-1)
            if self.compile and self.is_logger:
                log.info("parallel.overlap_param_gather: off under train.compile (a compiled forward cannot wait "
                         "for one bucket's all-gather per module); each step waits for its gathers")
            if not self.compile:
                self.optimizer.overlap_gathers_with_forward()
        if self.offload is not None and self.pipeline.splits_backward:
            self.offload.cache.release_on_unpack = False  # I and W both unpack: released at the step's end
        self.crash_at = fault_step(self.grid.rank)  # PLAIT_FAULT_AT_STEP: restart tests only, read once
        self.checkpoint_dir = checkpoint_root(cfg, self.run_dir)
        self.checkpointer = Checkpointer(self.checkpoint_dir, self.grid, self.device, keep=int(cfg.checkpoint.keep),
                                         keep_every=int(cfg.checkpoint.keep_every),
                                         asynchronous=bool(cfg.checkpoint.async_save),
                                         on_error=cfg.checkpoint.on_error)
        self.checkpoint_step = None  # the step of the last checkpoint written or resumed from
        resume_from = resume_target(cfg, self.checkpoint_dir, self.grid)
        if resume_from is not None:
            self.load_state(reshard.ShardReader(resume_from))
            self.checkpoint_step = self.step_num
            self.sink.forget_after(self.step_num)  # a killed run logged steps past its checkpoint: they rerun
        elif cfg.checkpoint.init_from:
            self._init_weights(Path(cfg.checkpoint.init_from))

    # construction -------------------------------------------------------------------
    @torch.no_grad()
    def _init_weights(self, path: Path) -> None:
        """`checkpoint.init_from`: initial weights only (step 0, fresh optimizer), from a Hugging Face Llama
        directory (config.json + model.safetensors) or from a plait checkpoint of any layout."""
        if (path / "config.json").is_file() and not (path / INDEX).is_file():
            for chunk in self.chunks:
                init_from_hf(chunk, path, self.grid, self.grads.copy_whole)
        else:
            self._load_params(reshard.ShardReader(path))
        log.info("checkpoint: initial weights from %s", path)

    def _load_params(self, reader: "reshard.ShardReader") -> None:
        """This rank's parameters from a checkpoint of any layout (ZeRO-2/3: whole, then this rank's rows), and the
        experts' routing biases where it holds them (a checkpoint saved without them leaves them at zero)."""
        with self.grads.whole_for_writing() as whole:
            reshard.load_params(reader, whole, self.specs, self.grid, self.mirrors)
        biases = expert_biases(self.chunks)
        saved = {name: bias for name, bias in biases.items() if name in reader.index["params"]}
        with torch.no_grad():
            reshard.load_params(reader, saved, self._buffer_specs(saved), self.grid)
        if len(saved) < len(biases) and self.is_logger:
            log.info("checkpoint: %s holds no routing biases; they start at zero", reader.path)

    @staticmethod
    def _buffer_specs(buffers: Dict[str, torch.Tensor]) -> Dict[str, ShardSpec]:
        """Replicated specs for buffers a checkpoint holds beside the weights (every rank has them whole)."""
        return {name: ShardSpec(tuple(buffer.shape), None) for name, buffer in buffers.items()}

    def _build_chunks(self) -> List[Transformer]:
        """The whole model (pp == 1) or this pp rank's vpp chunks, on the device."""
        cfg = self.cfg
        self.parametrization = build_parametrization(cfg.model, cfg.optim)  # muP or standard, by optim.mup
        float8 = float8_gemms(cfg.train.precision)
        self.tp_overlap, why = overlap_wanted(cfg.parallel.tp_overlap, self.grid.tp, splits_backward(cfg.parallel),
                                              float8)
        if self.is_logger and self.grid.tp > 1:
            log.info("tp overlap: %s (%s)", "on" if self.tp_overlap else "off", why)
        chunks = build_chunks(cfg.model, self.grid, cfg.parallel.vpp, cfg.train.seed, device=self.device,
                              sequence_parallel=cfg.parallel.sequence_parallel, scales=self.parametrization.scales,
                              std_of=self.parametrization.std_of, placement=placement(self.schedule),
                              cp_mode=cfg.parallel.cp_mode, tp_overlap=self.tp_overlap,
                              float8=float8)  # pp == 1: one chunk
        if self.is_logger and float8:
            log.info("float8: the linear layers' GEMMs in e4m3 (forward) and e5m2 (grads), scaled per tensor; "
                     "the embedding, head and routers in bf16")
        for chunk in chunks:
            if self.parametrization.zero_query:
                zero_queries(chunk)
        n_params = sum(p.numel() for chunk in chunks for p in chunk.parameters())
        if self.is_logger:
            log.info("model %s: %.2fM parameters on this rank (%s)", cfg.model.name, n_params / 1e6,
                     self.grid.layout.describe())
        return chunks

    def _build_tied(self) -> Optional[TiedWeights]:
        """The embedding group summing the grads of the embedding and its copies on the last stage (a tied head,
        multi-token prediction's embedding; collective: every rank makes every group)."""
        names = tied_names(self.cfg.model)
        if len(names) == 1 or self.grid.pp == 1:
            return None
        vpp = chunks_per_rank(self.schedule, self.cfg.parallel.vpp)
        return TiedWeights(self.grid, stage_ranks(self.grid.pp, vpp, placement(self.schedule)), names)

    def _build_offload(self, chunks):
        """SSDTrain-style activation offload attached to each of this rank's chunks (None: backend none)."""
        if self.cfg.offload.backend == "none":
            return None
        from plait.offload import ActivationOffload

        offload = ActivationOffload(self.cfg.offload, self.grid, self.device)
        for chunk in chunks:
            offload.attach(chunk)
        return offload

    def _build_pipeline(self, microbatches: int) -> PipelineRuntime:
        """The schedule runtime over this rank's chunks (compiled with train.compile) for steps of `microbatches`;
        at pp == 1 its 1F1B schedule is forward and backward of each micro-batch in turn, with no message."""
        cfg = self.cfg
        shape = hidden_shape(self.micro_batch, cfg.train.seq_len, cfg.model.dim, self.grid.tp,
                             cfg.parallel.sequence_parallel, self.grid.cp)
        runtime = PipelineRuntime(self.modules, self.grid, schedule=self.schedule, vpp=cfg.parallel.vpp,
                                  microbatches=microbatches, hidden_shape=shape, transport=cfg.parallel.pp_transport)
        if self.is_logger and self.grid.pp > 1:
            groups = ""
            if runtime.schedule == "interleaved":
                sizes = microbatch_groups(self.grid.pp, runtime.microbatches)
                groups = f" (in groups of {'+'.join(map(str, sizes))})"
            log.info("pipeline: %s schedule, pp %d x vpp %d, %d micro-batches%s, messages over %s", runtime.schedule,
                     self.grid.pp, cfg.parallel.vpp, microbatches, groups, runtime.transport_name)
        return runtime

    def _pipeline_for(self, microbatches: int) -> PipelineRuntime:
        """The runtime for a step of `microbatches`: the run's own, or, while the batch ramps up, one built for the
        current count (the ramp only grows, so the one before it is let go)."""
        if microbatches == self.pipeline.microbatches:
            self.ramp_pipeline = None
            return self.pipeline
        if self.ramp_pipeline is None or self.ramp_pipeline.microbatches != microbatches:
            self.ramp_pipeline = None  # its buffers go before the next one's are made
            self.ramp_pipeline = self._build_pipeline(microbatches)
        return self.ramp_pipeline

    def _pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.chunks[-1].loss(logits, targets)

    def _autocast(self):
        return autocast(self.device, self.cfg.train.precision)

    def _log_layout(self) -> None:
        """Rank 0 logs, for every rank, its grid coordinates, the layers it holds and its ZeRO-1 shard."""
        layers = [int(i) for chunk in self.chunks for i in chunk.layers.keys()]
        parts = [f"rank {self.grid.rank}: pp {self.grid.pp_rank} tp {self.grid.tp_rank} dp {self.grid.dp_rank}",
                 f"layers {','.join(map(str, layers))}" if layers else "no layers"]
        if any(chunk.has_embedding for chunk in self.chunks):
            parts.append("embedding")
        if any(chunk.has_head for chunk in self.chunks):
            parts.append("head")
        if self.moe_layers:  # a mixture of experts: the experts this rank holds (all but under expert parallelism)
            moe = self.moe_layers[0]
            held = [int(e) for e in moe.experts.keys()]
            parts.append(f"experts {held[0]}-{held[-1]} of {moe.n_experts} ({moe.describe()}, ep rank "
                         f"{self.grid.ep_rank} of {self.grid.ep})")
        parts.append(f"{sum(p.numel() for p in self.named_params.values()) / 1e6:.2f}M params")
        if self.grads_sharded_over_dp:
            parts.append(f"ZeRO-{self.cfg.parallel.zero} shard {sum(g.numel() for _, g in self.grad_entries()) / 1e6:.2f}M")
        line = ", ".join(parts)
        lines = [line]
        if self.grid.world_size > 1:
            lines = [None] * self.grid.world_size
            dist.all_gather_object(lines, line)
        if self.is_logger:
            log.info("layout: %s", self.grid.layout.describe())
            for entry in lines:
                log.info("  %s", entry)

    def _build_grads(self):
        """Where gradients are reduced: plait's bucketed reducer (zero 0/1: all-reduce or reduce-scatter into a
        flat buffer), or FSDP2 (zero 2/3: reduce-scattered into each rank's shard as each block's backward ends)."""
        cfg = self.cfg
        self.fsdp = cfg.parallel.zero in FSDP_LEVELS and self.grid.mesh is not None
        if cfg.parallel.zero in FSDP_LEVELS and not self.fsdp and self.is_logger:
            log.info("parallel.zero=%d: one process, nothing to shard; weights, grads and state stay whole",
                     cfg.parallel.zero)
        if self.fsdp:
            return ShardedGrads(self.chunks, self.grid, cfg.parallel.zero, cfg.train.precision,
                                cfg.parallel.reduce_in_fp32)
        alone = tied_names(self.cfg.model) if self.tied is not None else ()  # ZeRO-1 slices of them alike
        return DataParallelGrads(self.chunks, self.grid, cfg.parallel, shard=cfg.parallel.zero == 1, alone=alone)

    def _build_optimizer(self) -> Tuple[object, Callable[[], List[Tuple[str, torch.Tensor]]]]:
        """The configured optimizer (or ZeRO-1 around it: each dp rank steps its shard), and where the
        grads it updates are read from: (name, averaged grad) whole, or this rank's ZeRO-1 pieces."""
        cfg = self.cfg
        matrices = self._muon_matrices() if cfg.optim.name == "muon" else None
        make = lambda groups: make_optimizer(groups, cfg.optim, self.device, matrices)  # noqa: E731
        if self.fsdp:
            optimizer = ShardOptimizer(self.grads, make, param_groups(self.named_params, cfg.optim.weight_decay,
                                                                      self.param_group_of))
            return optimizer, optimizer.grad_entries
        if cfg.parallel.zero == 1:
            optimizer = ZeroOptimizer(self.grads, self.grid, make,
                                      param_groups(self.named_params, cfg.optim.weight_decay, self.param_group_of))
            return optimizer, optimizer.grad_entries
        return (build_optimizer(self.named_params, cfg.optim, self.param_group_of, self.device, matrices),
                self.grads.named_grads)

    def _muon_matrices(self):
        """Where Muon finds its whole matrices: the hidden ones of this rank's chunks, as tp and ZeRO split them (an
        expert's, under expert parallelism, over the ranks holding it)."""
        names = [name for name, param in self.named_params.items() if self.param_group_of(name, param).get("muon")]
        dtype = self.named_params[names[0]].dtype if names else torch.float32

        def matrices(chosen, experts: bool = False) -> ShardedMatrices:
            return ShardedMatrices({name: self.specs[name] for name in chosen}, self.grid, self.grads_sharded_over_dp,
                                   dtype, NS_DTYPES[self.cfg.optim.muon_ns_dtype], experts=experts)

        if self.grid.ep == 1:
            return matrices(names)
        return ExpertSplitMatrices(matrices([n for n in names if not self.specs[n].expert]),
                                   matrices([n for n in names if self.specs[n].expert], experts=True))

    def _build_loader(self) -> Loader:
        cfg = self.cfg
        return self._rank0_first(lambda: Loader.from_config(
            cfg.data, cfg.train.seq_len, cfg.train.batch_size, cfg.parallel.microbatches, self.grid.dp_rank,
            self.grid.dp, cfg.train.seed, self.device, cfg.model.vocab_size, self.ramp))

    def _document_eos(self) -> Optional[int]:
        """The token that separates documents, when `model.attn_mask=document` keeps attention inside them."""
        if self.cfg.model.attn_mask != "document":
            return None
        if self.loader.eos is None:
            raise DataError("model.attn_mask=document needs the data's end-of-document token, which this data does "
                            "not record (Megatron shards, or corpora that differ); set data.eos_id.")
        if self.is_logger:
            log.info("attention: inside documents (token %d opens each)", self.loader.eos)
        return self.loader.eos

    def _rank0_first(self, work: Callable):
        """`work()` on rank 0 first (it tokenizes and caches the corpus), then on the others. If it fails on
        rank 0, every rank raises rank 0's error (rank 0 alone reports it) instead of waiting for it forever."""
        if self.grid.world_size == 1:
            return work()
        outcome: List = [None]
        if self.grid.rank == 0:
            try:
                result = work()
            except Exception as error:
                outcome[0] = error
                dist.broadcast_object_list(outcome, src=0)
                raise
            dist.broadcast_object_list(outcome, src=0)
            return result
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise outcome[0]
        return work()

    # one step ---------------------------------------------------------------------
    def _finish_grads(self, loss_scale: float) -> Tuple[torch.Tensor, bool]:
        """Wait for the dp reduction, sum sequence-parallel partial grads over tp, unscale (fp16) and clip;
        returns the norm of the unscaled grads and whether to skip the step: under fp16, an inf or nan grad
        anywhere (the norm is summed over every rank, so all agree; the grads are then left as they are)."""
        self.grads.finish()
        entries = self.grad_entries()
        all_reduce_coalesced([g for n, g in entries if self.specs[n].tp_partial_grad],
                             self.grid.tp_group if self.grid.tp > 1 else None)
        if self.tied is not None:  # the embedding's and the head copy's grads summed: one matrix, counted once
            self.tied.sync(entries)
        norm = global_grad_norm([(g, self.specs[n]) for n, g in entries if n not in self.mirrors], self.grid,
                                dp_sharded=self.grads_sharded_over_dp) / loss_scale
        overflow = self.loss_scaler is not None and not bool(torch.isfinite(norm))
        if not overflow:
            clip_by_norm([g for _, g in entries], self.cfg.optim.grad_clip, norm, loss_scale)
        return norm, overflow

    def step(self) -> Dict[str, float]:
        """One optimizer step on the global batch of step `step_num`; returns its metrics."""
        start = time.perf_counter()
        lr = apply_lr(self.optimizer, self.updates_done(), self.cfg.train.steps, self.cfg.optim)
        with record_function("plait.data"):
            batch = self.loader.batch(self.step_num)
        if self.offload is not None:
            self.offload.begin_step()  # also cleans up after a step that raised
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        for layer in self.moe_layers:  # the load-balancing grad joins backward at the main loss's own scale
            layer.aux_grad_scale = scale / batch.shape[0]
        with record_function("plait.forward_backward"):
            loss = self._pipeline_for(batch.shape[0]).run(
                *self._inputs_and_targets(batch), self._pipeline_loss, chunk_kwargs=self._chunk_kwargs(batch),
                before_last_backward=self.grads.start_overlap, after_weights=self.grads.after_weights,
                forward_context=self._autocast, loss_scale=scale)
        offload_metrics = self.offload.end_step() if self.offload is not None else {}
        with record_function("plait.grad_finish"):  # waits for the grad reduction, sums tp/tied grads, clips
            norm, overflow = self._finish_grads(scale)
        self.checkpointer.before_update()  # a background save's snapshot is taken before the weights change
        with record_function("plait.optimizer"):
            if not overflow:
                self.optimizer.step()
        moe = self._moe_step(overflow) if self.moe_layers else {}
        mtp = self._mtp_metrics() if self.cfg.model.mtp_layers else {}
        self.updated = not overflow  # (the optimizer state exists once a step has updated)
        held = self._held_bytes()  # after the update (the state exists), before the grads are let go
        weights = {"params_norm": self.params_norm()} if self.cfg.train.log_params_norm else {}
        self.grads.zero_grad()
        loss = all_reduce_mean(loss, self.grid.grad_group)  # each dp (and cp) rank's share of the batch
        self.step_num += 1
        elapsed = time.perf_counter() - start
        batch_size = self.loader.batch_at(self.step_num - 1)[1]
        tokens_per_s = batch_size * self.cfg.train.seq_len / elapsed
        ramping = {"batch_size": batch_size} if self.ramp is not None else {}
        scaling = {}
        if self.loss_scaler is not None:
            self.loss_scaler.update(overflow)
            scaling = {"loss_scale": scale, "skipped_steps": self.loss_scaler.skipped}
        return {"loss": float(loss), "lr": lr, "grad_norm": float(norm), "tokens_per_s": tokens_per_s,
                "mfu": tokens_per_s * self.flops_per_token / (self.peak_flops * self.grid.world_size),
                "step_time_s": elapsed, **ramping, **scaling, **weights, **moe, **mtp, **held,
                **offload_metrics}

    def params_norm(self) -> float:
        """The L2 norm of all the weights, each counted once as in one process (tp shards, ZeRO pieces, a tied copy
        left out), the same on every rank (an all-reduce over tp x pp, and the grad group under ZeRO)."""
        entries = self.optimizer.param_entries() if self.grads_sharded_over_dp else list(self.named_params.items())
        return float(global_grad_norm([(t.detach(), self.specs[n]) for n, t in entries if n not in self.mirrors],
                                      self.grid, dp_sharded=self.grads_sharded_over_dp))

    def _moe_step(self, overflow: bool) -> Dict[str, float]:
        """After the update: the step's expert loads, summed over the grad group (dp x cp: the ranks that route other
        tokens through these layers), move the routing biases (aux-loss-free balancing; a step fp16 skipped moves
        nothing); and the step's MoE metrics."""
        loads = step_loads(self.moe_layers, self.grid.grad_group if self.grid.grad_size > 1 else None)
        if self.moe_layers[0].expert_bias is not None and not overflow:
            update_expert_bias(self.moe_layers, loads)
        return self._moe_metrics(loads)

    def _moe_metrics(self, loads: torch.Tensor) -> Dict[str, float]:
        """The step's means over every MoE layer, the same on every rank: the load-balancing loss over micro-batches
        and ranks (1: an even load; E/k: every token to the same k experts), the max violation of the loads (the
        busiest expert over the mean, less 1), with `model.moe_z_loss` the router z-loss, and with a capacity the
        share of (token, choice) pairs dropped: Megatron's load_balancing_loss and z_loss, DeepSeek's MaxVio."""
        violation = max_violation(loads)  # this rank's layers (its pp stage); tp ranks repeat the same sums
        violations = torch.stack([violation.sum(), violation.new_tensor(float(violation.numel()))])
        total = torch.cat([take_balance(self.moe_layers).to(self.device), violations.to(self.device)])
        if self.grid.world_size > 1:
            dist.all_reduce(total)  # over every rank: sums and counts alike, so the ratios are means
        metrics = {"moe_balance": float(total[0] / total[3]), "moe_max_violation": float(total[4] / total[5])}
        if self.moe_layers[0].z_loss:
            metrics["moe_z_loss"] = float(total[1] / total[3])
        if self.moe_layers[0].capacity_factor is not None:
            metrics["moe_dropped"] = float(total[2] / total[3])
        return metrics

    def _mtp_metrics(self) -> Dict[str, float]:
        """The step's mean multi-token prediction loss (over its depths, micro-batches and ranks), the same on every
        rank: each rank's sums and counts, summed over all of them (a rank without the MTP depths adds zeros)."""
        totals = take_losses(self.mtp).to(self.device) if self.mtp is not None else torch.zeros(2, device=self.device)
        if self.grid.world_size > 1:
            dist.all_reduce(totals)
        return {"mtp_loss": float(totals[0] / totals[1])}

    def updates_done(self) -> int:
        """Optimizer updates so far: the steps less those fp16 skipped on an overflow. The learning-rate schedule
        counts these, as Megatron's and DeepSpeed's do (a skipped step does not move the schedule)."""
        return self.step_num - (self.loss_scaler.skipped if self.loss_scaler is not None else 0)

    def _held_bytes(self) -> Dict[str, int]:
        """Bytes of weights, grads and optimizer state this rank holds (its shards under ZeRO), counted from
        the live tensors: the step metrics' memory split. A sharded optimizer's `state` is its inner one's."""
        weights = sum(local(p).numel() * p.element_size() for p in self.named_params.values())
        return {"weight_bytes": weights, "grad_bytes": self.grads.grad_bytes(),
                "optimizer_bytes": state_bytes(self.optimizer)}

    @torch.no_grad()
    def evaluate(self, batches: Optional[int] = None) -> float:
        """Mean held-out loss (nats per token) over `train.eval_batches` fixed validation batches."""
        total = torch.zeros((), device=self.device)
        count = batches or self.cfg.train.eval_batches
        self.model.eval()
        for index in range(count):  # forwards only, through the stages; the loss comes from the last
            batch = self.loader.val_batch(index)
            total += self.pipeline.run(*self._inputs_and_targets(batch), self._pipeline_loss, forward_only=True,
                                       forward_context=self._autocast, chunk_kwargs=self._chunk_kwargs(batch)) / count
        self.grads.reshard()  # ZeRO-2/3: weights the forwards gathered are let go (no backward did it)
        self.model.train()
        return float(all_reduce_mean(total, self.grid.grad_group))

    def _inputs_and_targets(self, batch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Next-token inputs and targets of [m, b, seq + 1] tokens: this cp rank's zigzag share of each sequence
        (all of it at cp = 1); every cp rank's share has as many tokens, so the mean of their losses is the loss."""
        cp, rank = self.grid.cp, self.grid.cp_rank
        return split_sequence(batch[:, :, :-1], cp, rank), split_sequence(batch[:, :, 1:], cp, rank)

    def _chunk_kwargs(self, batch: torch.Tensor) -> Optional[List[Dict[str, torch.Tensor]]]:
        """Per micro-batch, what every chunk's forward takes beside its input: under a document mask, the document
        number of each token of the whole sequence (all cp ranks' shares: Ulysses attends over all of it); with
        multi-token prediction, the tokens ahead of each of this cp rank's positions, cut from the whole sequence."""
        kwargs: List[Dict[str, torch.Tensor]] = [{} for _ in range(batch.shape[0])]
        if self.document_eos is not None:
            documents = document_ids(batch[:, :, :-1], self.document_eos)
            for mb, entry in enumerate(kwargs):
                entry["documents"] = documents[mb]
        if self.cfg.model.mtp_layers:
            future = split_sequence(future_tokens(batch, self.cfg.model.mtp_layers), self.grid.cp, self.grid.cp_rank)
            for mb, entry in enumerate(kwargs):
                entry["future"] = future[mb]
        return kwargs if kwargs[0] else None

    def _tighten_timeouts(self, seconds: int) -> None:
        """Every training process group's collectives (and pipeline receives) fail after `seconds` from now on. The
        background checkpoint writer's group keeps `parallel.timeout_s`: a write legitimately outlasts a step."""
        for group in process_groups():
            if group is not self.checkpointer.group:
                set_group_timeout(group, seconds)
        for pipeline in (self.pipeline, self.ramp_pipeline):
            if pipeline is not None:
                pipeline.set_timeout(seconds)
        if self.is_logger:
            log.info("collective timeout: %d s from step %d on (parallel.train_timeout_s; %d s before)", seconds,
                     self.step_num + 1, int(self.cfg.parallel.timeout_s))

    # the loop ---------------------------------------------------------------------
    def fit(self) -> Dict[str, float]:
        """Train to `train.steps`, logging every `log_every` and validating every `eval_every`."""
        cfg, last = self.cfg.train, {}
        if self.is_logger:
            log.info("run directory: %s", self.run_dir)
        preemption = PreemptionFlag()  # SIGTERM / SIGUSR1 / Ctrl-C only raise a flag; all ranks agree below
        buffers_wanted = int(self.cfg.checkpoint.every) > 0  # made once the optimizer state exists (the first update)
        deadline = self.started + 60.0 * float(cfg.max_minutes) if cfg.max_minutes else math.inf
        tighten = self.cfg.parallel.train_timeout_s is not None and self.grid.world_size > 1
        while self.step_num < cfg.steps:
            if self.step_num == self.crash_at:
                crash(self.step_num, self.grid.rank)
            self.profiler.before(self.step_num + 1)
            record = self.step()
            self.profiler.after(self.step_num)
            if tighten:  # the first step is done (loaded, compiled, warmed up): a stuck rank now ends the job soon
                self._tighten_timeouts(int(self.cfg.parallel.train_timeout_s))
                tighten = False
            if buffers_wanted and self.updated:  # the snapshot buffers, made in the background as the next steps run
                self.checkpointer.prepare(self.state())
                buffers_wanted = False
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"loss is {record['loss']} at step {self.step_num}; lower optim.lr.")
            self.sink.advance(self.step_num)
            if self.step_num % cfg.log_every == 0 or self.step_num == cfg.steps:
                record["memory_bytes"] = metrics_lib.peak_memory_bytes(self.device)
                self.sink.write(self.step_num, record)
            if cfg.eval_every and (self.step_num % cfg.eval_every == 0 or self.step_num == cfg.steps):
                record["val_loss"] = self.evaluate()
                self.sink.write(self.step_num, {"val_loss": record["val_loss"]})
            last = record
            if due(self.cfg, self.step_num):
                self.save_checkpoint()
            if time.monotonic() >= deadline:
                preemption.out_of_time()
            decision = preemption.decision(self.grid)
            if decision == "time":
                self.stop_for_time()
                break
            if decision is not None:
                preemption.restore()
                self.stop_for_requeue() if decision == "requeue" else self.stop_for_interrupt()
        preemption.restore()
        self.profiler.finish()  # a window cut short by a stop is written too
        if self.cfg.checkpoint.save_final and self.checkpoint_step != self.step_num:
            self.save_checkpoint()
        self.checkpointer.wait()  # the last write is on disk before fit returns
        self.sink.close()
        return last

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step under `checkpoint_dir` (collective: every rank calls it)."""
        path = self.checkpointer.save(self.state())
        self.checkpoint_step = self.step_num
        return path

    def stop_for_time(self) -> None:
        """`train.max_minutes` has passed (on some rank): checkpoint this step (unless just done); `fit` then
        returns as at the end of the run (exit status 0), and `train.resume=auto` goes on from here."""
        if self.checkpoint_step != self.step_num:
            self.save_checkpoint()
        if self.is_logger:
            log.info("stopping at step %d of %d: train.max_minutes=%g has passed; checkpointed under %s (go on "
                     "with train.resume=auto)", self.step_num, self.cfg.train.steps, self.cfg.train.max_minutes,
                     self.checkpoint_dir)

    def stop_for_requeue(self) -> None:
        """Preempted: checkpoint this step (unless just done), close the sinks, exit with the requeue status.

        Raises `plait.launch.Preempted`, a SystemExit carrying `launch.signals.REQUEUE_EXIT_CODE`.
        """
        path = self.save_checkpoint() if self.checkpoint_step != self.step_num else None
        self.checkpointer.wait()  # finish the write before the job is requeued
        self.sink.close()
        raise Preempted(self.step_num, path)

    def stop_for_interrupt(self) -> None:
        """Ctrl-C: checkpoint this step if checkpoints are on (unless just done), close the sinks, exit 130.

        Raises `plait.launch.Interrupted`, a SystemExit carrying 130.
        """
        wants = int(self.cfg.checkpoint.every) > 0 or self.cfg.checkpoint.save_final
        path = self.save_checkpoint() if wants and self.checkpoint_step != self.step_num else None
        self.checkpointer.wait()
        self.sink.close()
        raise Interrupted(self.step_num, path)

    def close(self) -> None:
        """Write a profile still open, finish any checkpoint still being written and any weight all-gather in
        flight, close the sinks."""
        if hasattr(self, "profiler"):
            self.profiler.finish()  # a window a failure cut short is written too
        if hasattr(self, "checkpointer"):
            self.checkpointer.close()
        if hasattr(self, "grads"):
            self.grads.wait_params()
        self.sink.close()

    # what a checkpoint holds --------------------------------------------------------
    def state(self, whole: bool = False) -> TrainerState:
        """This rank's part of a checkpoint: live tensors (a save snapshots them), RNG, loader position, step.

        The tensors are this rank's writer share (`own_names`: about 1/dp of its tp x pp position's parameters
        and their optimizer state; ZeRO gathers each tensor whole and keeps only those). `whole=True`: every
        parameter and state of the position (ZeRO: all gathered on every rank of the grad group).
        """
        from plait.optim.schedule import lr_factor
        from plait.optim.state import named_state

        cfg = self.cfg
        rank_state = {"step": self.step_num, "rank": self.grid.rank, "rng": self._rng_state(),
                      "loader": self.loader.state(),
                      "lr_schedule": {"step": self.updates_done(), "total_steps": int(cfg.train.steps),
                                      "factor": lr_factor(self.updates_done(), int(cfg.train.steps), cfg.optim)},
                      "config": OmegaConf.to_container(cfg, resolve=True)}
        if self.loss_scaler is not None:  # fp16's scale and counters (the same on every rank)
            rank_state["loss_scale"] = self.loss_scaler.state_dict()
        meta = {**layout_meta(self.grid, cfg.parallel.vpp, cfg.parallel.zero, cfg.parallel.sequence_parallel),
                **model_meta(cfg.model, self.parametrization.scales), "optimizer": cfg.optim.name,
                "tokenizer": self.loader.tokenizer}
        dest = None if whole else writer_ranks(self.specs, self.grid)  # {name: the rank that writes it}
        optim_state = named_state(self.optimizer, self.named_params, copy=False, dest=dest)  # collective under ZeRO
        params = self.grads.full_params(dest)  # ZeRO-2/3: each gathered on its writer
        specs = self.specs
        biases = expert_biases(self.chunks)  # routing biases: replicated, saved beside the weights
        if biases:
            params, specs = {**params, **biases}, {**specs, **self._buffer_specs(biases)}
        if self.mirrors:  # a tied copy is not saved: the embedding stands for it (any layout reads it from there)
            params = {n: p for n, p in params.items() if n not in self.mirrors}
            optim_state = {n: s for n, s in optim_state.items() if n not in self.mirrors}
            specs = {n: s for n, s in specs.items() if n not in self.mirrors}
        state = TrainerState(self.step_num, params, specs, optim_state, rank_state, meta)
        return state if whole else state.share(self.grid)

    def load_state(self, reader: "reshard.ShardReader") -> None:
        """Load model, optimizer, step, RNG and loader position from a checkpoint of any layout."""
        from plait.optim.state import load_named_state

        grid = self.grid
        if int(reader.index["step"]) > int(self.cfg.train.steps):
            raise reshard.CheckpointError(
                f"{reader.path} is at step {reader.index['step']}, past train.steps={self.cfg.train.steps}; raise "
                f"train.steps to train on, or resume an earlier checkpoint.")
        saved = reader.index.get("optimizer")
        if saved is not None and saved != self.cfg.optim.name:  # its state would not fit this optimizer's
            raise reshard.CheckpointError(
                f"{reader.path} was trained with optim={saved} and holds its state; resume with optim={saved}, or "
                f"start from its weights with a fresh optimizer: checkpoint.init_from={reader.path} "
                f"train.resume=none.")
        self._load_params(reader)
        optim_state = reshard.load_optim_state(reader, self.named_params, self.specs, grid, self.mirrors)
        load_named_state(self.optimizer, self.named_params, optim_state)  # ZeRO-1 keeps its dp shard
        same = reshard.same_layout(reader.index, grid, int(self.cfg.parallel.vpp))
        rank_state = reader.rank_state(grid.rank if same else 0)
        self.step_num = int(rank_state["step"])
        if rank_state.get("loader") is not None:
            self.loader.load_state(rank_state["loader"])  # (seed, step, global batch): the same under any dp
        if self.loss_scaler is not None and rank_state.get("loss_scale") is not None:
            self.loss_scaler.load_state_dict(rank_state["loss_scale"])  # else (from fp32 or bf16) it starts afresh
        if same:
            self._load_rng_state(rank_state["rng"])
        else:
            log.info("checkpoint: layout changed (%s -> %s); per-rank RNG streams start from the seed",
                     reader.index.get("layout"), grid.layout.describe())
        log.info("checkpoint: resumed from %s at step %d", reader.path, self.step_num)

    def _rng_state(self) -> Dict:
        state = {"torch": encode_bytes(torch.get_rng_state())}
        if self.device.type == "cuda":
            state["cuda"] = encode_bytes(torch.cuda.get_rng_state(self.device))
        rng = self.chunks[0].rng  # the ParallelRNG dropout draws from (one per rank, shared by its chunks)
        if rng is not None:
            state["parallel"] = {key: encode_bytes(value) for key, value in rng.state().items()}
        return state

    def _load_rng_state(self, state: Dict) -> None:
        torch.set_rng_state(decode_bytes(state["torch"]))
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(decode_bytes(state["cuda"]), self.device)
        rng = self.chunks[0].rng
        if rng is not None and "parallel" in state:
            rng.load_state({key: decode_bytes(value) for key, value in state["parallel"].items()})
