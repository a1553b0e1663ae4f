"""The training loop as a library: `Trainer(cfg).step()` runs one optimizer step.

The trainer builds, in order: the process environment and group, the validated layout,
the grid, the model (this rank's chunks), the optimizer, the loader and the metric sinks.
`plait-train` is a thin loop over `fit()`; a custom loop can call `step()` and
`evaluate()` itself, or build the pieces directly from `plait.parallel`, `plait.optim`
and `plait.data`.
"""

import datetime
import logging
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from plait.data.loader import Loader
from plait.launch.env import ProcessEnv, detect, init_process_group, pick_device
from plait.launch.faults import crash_if_due
from plait.launch.rundir import resolve_run_dir
from plait.launch.signals import PreemptionFlag
from plait.optim.builder import build_optimizer
from plait.optim.clip import clip_by_norm, global_grad_norm
from plait.optim.schedule import apply_lr
from plait.parallel.grid import Grid
from plait.parallel.tensor import all_reduce_coalesced, allreduce_partial_grads
from plait.train import checkpoint as checkpoint_lib
from plait.train import metrics as metrics_lib
from plait.train.config import Config, micro_batch_size, to_yaml, validate
from plait.train.model import Transformer, build_model
from plait.train.parametrization import build_parametrization, zero_queries
from plait.train.step import autocast, forward_backward

log = logging.getLogger("plait")


def all_reduce_mean(value: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(value, group=group)
        value /= dist.get_world_size(group)
    return value


class Trainer:
    """Builds everything a run needs from a composed config; `step()` trains one step."""

    def __init__(self, cfg: Config, env: Optional[ProcessEnv] = None):
        self.cfg = cfg
        self.env = env or detect()
        validate(cfg, self.env.world_size)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        self.device = pick_device(cfg.train.device, self.env.local_rank)
        init_process_group(self.env, self.device, cfg.parallel.backend)
        self.grid = Grid.build(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp, self.device)
        self.is_logger = self.grid.rank == 0
        self.micro_batch = micro_batch_size(cfg, self.grid.dp)
        torch.manual_seed(cfg.train.seed)
        self.model = self._build_model()
        self.offload = self._build_offload([self.model])  # None unless offload.backend is set
        self.named_params = dict(self.model.named_parameters())
        self.specs = self.model.param_specs()
        self.partial_grad_params = [p for n, p in self.named_params.items() if self.specs[n].tp_partial_grad]
        self.optimizer = build_optimizer(self.named_params, cfg.optim, self.parametrization.group_of, self.device)
        self.loader = self._build_loader()
        self.run_dir = resolve_run_dir(cfg, self.grid)
        self.step_num = 0
        self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        self.flops_per_token = metrics_lib.flops_per_token(cfg.model, cfg.train.seq_len)
        self.peak_flops = cfg.train.peak_flops or metrics_lib.measure_peak_flops(self.device)
        self.sink = metrics_lib.MetricsSink(
            self.run_dir, cfg.train.steps, self.is_logger, cfg.train.progress, cfg.logging.wandb,
            cfg.logging.tensorboard, OmegaConf.to_container(cfg, resolve=True) if self.is_logger else None)
        if self.is_logger:
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self._forward = torch.compile(self.model) if cfg.train.compile else self.model
        self.checkpoint_dir = checkpoint_lib.checkpoint_root(cfg, self.run_dir)
        self.checkpoint_step = None  # the step of the last checkpoint written or resumed from
        resume_from = checkpoint_lib.resume_target(cfg, self.checkpoint_dir, self.grid)
        if resume_from is not None:
            checkpoint_lib.restore_trainer(self, resume_from)
            self.checkpoint_step = self.step_num
        elif cfg.checkpoint.init_from:
            checkpoint_lib.init_weights(self, cfg.checkpoint.init_from)

    # construction -------------------------------------------------------------------
    def _build_model(self) -> Transformer:
        cfg = self.cfg
        self.parametrization = build_parametrization(cfg.model, cfg.optim)  # muP or standard, by optim.mup
        model = build_model(cfg.model, self.grid, cfg.train.seed, sequence_parallel=cfg.parallel.sequence_parallel,
                            scales=self.parametrization.scales, std_of=self.parametrization.std_of)
        if self.parametrization.zero_query:
            zero_queries(model)
        model.to(self.device)
        n_params = sum(p.numel() for p in model.parameters())
        if self.is_logger:
            log.info("model %s: %.2fM parameters on this rank (%s)", cfg.model.name, n_params / 1e6,
                     self.grid.layout.describe())
        return model

    def _build_offload(self, chunks):
        """SSDTrain-style activation offload attached to each of this rank's chunks (None: backend none)."""
        if self.cfg.offload.backend == "none":
            return None
        from plait.offload import ActivationOffload

        offload = ActivationOffload(self.cfg.offload, self.grid, self.device)
        for chunk in chunks:
            offload.attach(chunk)
        return offload

    def _build_loader(self) -> Loader:
        cfg = self.cfg
        if self.grid.world_size > 1 and self.grid.rank != 0:
            dist.barrier()  # rank 0 tokenizes and caches the corpus first
        loader = Loader.from_config(cfg.data, cfg.train.seq_len, cfg.train.batch_size, cfg.parallel.microbatches,
                                    self.grid.dp_rank, self.grid.dp, cfg.train.seed, self.device, cfg.model.vocab_size)
        if self.grid.world_size > 1 and self.grid.rank == 0:
            dist.barrier()
        return loader

    # one step ---------------------------------------------------------------------
    def _finish_grads(self) -> None:
        """Sum sequence-parallel partial grads over tp, then average grads over dp."""
        allreduce_partial_grads(self.partial_grad_params, self.grid)
        all_reduce_coalesced([p.grad for p in self.named_params.values()], self.grid.dp_group, self.grid.dp)

    def step(self) -> Dict[str, float]:
        """One optimizer step on the global batch of step `step_num`; returns its metrics."""
        start = time.perf_counter()
        lr = apply_lr(self.optimizer, self.step_num, self.cfg.train.steps, self.cfg.optim)
        batch = self.loader.batch(self.step_num)
        if self.offload is not None:
            self.offload.begin_step()  # also cleans up after a step that raised
        loss = forward_backward(self._forward_module(), batch, self.cfg.train.precision)
        offload_metrics = self.offload.end_step() if self.offload is not None else {}
        self._finish_grads()
        entries = [(p.grad, self.specs[n]) for n, p in self.named_params.items()]
        norm = global_grad_norm(entries, self.grid)
        clip_by_norm([p.grad for p in self.named_params.values()], self.cfg.optim.grad_clip, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = all_reduce_mean(loss, self.grid.dp_group)
        self.step_num += 1
        elapsed = time.perf_counter() - start
        tokens_per_s = self.tokens_per_step / elapsed
        return {"loss": float(loss), "lr": lr, "grad_norm": float(norm), "tokens_per_s": tokens_per_s,
                "mfu": tokens_per_s * self.flops_per_token / (self.peak_flops * self.grid.world_size),
                "step_time_s": elapsed, **offload_metrics}

    def _forward_module(self):
        return self._forward if self.cfg.train.compile else self.model

    @torch.no_grad()
    def evaluate(self, batches: Optional[int] = None) -> float:
        """Mean held-out loss (nats per token) over `train.eval_batches` fixed validation batches."""
        total = torch.zeros((), device=self.device)
        count = batches or self.cfg.train.eval_batches
        self.model.eval()
        for index in range(count):
            batch = self.loader.val_batch(index)
            for micro in batch:
                with autocast(self.device, self.cfg.train.precision):
                    logits = self.model(micro[:, :-1])
                total += self.model.loss(logits, micro[:, 1:]).float() / (count * batch.shape[0])
        self.model.train()
        return float(all_reduce_mean(total, self.grid.dp_group))

    # the loop ---------------------------------------------------------------------
    def fit(self) -> Dict[str, float]:
        """Train to `train.steps`, logging every `log_every` and validating every `eval_every`."""
        cfg, last = self.cfg.train, {}
        if self.is_logger:
            log.info("run directory: %s", self.run_dir)
        preemption = PreemptionFlag()  # SIGTERM / SIGUSR1 only raise a flag; all ranks agree below
        while self.step_num < cfg.steps:
            crash_if_due(self.step_num, self.grid.rank)  # PLAIT_FAULT_AT_STEP: restart tests only
            record = self.step()
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
            if checkpoint_lib.due(self.cfg, self.step_num):
                self.save_checkpoint()
            if preemption.should_stop(self.grid):
                preemption.restore()
                self.stop_for_requeue()
        preemption.restore()
        if self.cfg.checkpoint.save_final and self.checkpoint_step != self.step_num:
            self.save_checkpoint()
        self.sink.close()
        return last

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step under `checkpoint_dir` (collective: every rank calls it)."""
        path = checkpoint_lib.save_trainer(self)
        self.checkpoint_step = self.step_num
        return path

    def stop_for_requeue(self) -> None:
        """Preempted: checkpoint this step (unless just done), close the sinks, exit with the requeue status.

        Raises `checkpoint.Preempted`, a SystemExit carrying `launch.signals.REQUEUE_EXIT_CODE`.
        """
        path = self.save_checkpoint() if self.checkpoint_step != self.step_num else None
        self.sink.close()
        raise checkpoint_lib.Preempted(self.step_num, path)

    def close(self) -> None:
        self.sink.close()
