"""A training loop written by hand from plait's pieces: no Trainer, no Hydra.

tp 2 x pp 2 (interleaved: 2 virtual stages per pp rank) x dp 2 = 8 ranks. ZeRO-1 shards
Lion's state over dp, muP sets the init, per-group learning rates and forward multipliers,
the loader gathers batches from the unified tensor by (seed, step, dp rank), activation
offload moves saved activations to host memory, and a checkpoint is written at the end,
then read back into a freshly built model to check every weight.

    torchrun --nproc-per-node 8 examples/custom_loop.py --steps 6 --out /tmp/custom-loop

Every piece is built from explicit arguments (the grid, a config dataclass, plain values).
On CPU the ranks talk over gloo; on GPUs over NCCL, one GPU per rank, with no change here.
Rank 0 prints one `step <k> loss <value>` line per step and writes `<out>/result.json`.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from plait.data import Loader, prepare_text
from plait.launch import detect, init_process_group, pick_device
from plait.offload import ActivationOffload, OffloadConfig
from plait.optim import OptimConfig, apply_lr, clip_by_norm, make_optimizer, named_state, param_groups
from plait.parallel import (DataParallelGrads, Grid, ParallelConfig, PipelineRuntime, ZeroOptimizer, global_grad_norm,
                            param_specs)
from plait.train import (ModelConfig, SaveRequest, ShardReader, build_chunks, build_parametrization, hidden_shape,
                         load_params, save_checkpoint)
from plait.train.checkpoint import layout_meta, model_meta  # what the index records (for export and resharding)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default="custom-loop", help="checkpoints and result.json go here")
    parser.add_argument("--cache", default=None, help="token cache (default $PLAIT_CACHE or ~/.cache/plait)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(1)  # 8 ranks on a small machine: one thread each

    # 1. the process group and the grid (tp innermost, then dp, then pp; dp inferred from the world size)
    env = detect()  # torchrun, Slurm or a single process, from the environment
    device = pick_device("auto", env.local_rank)
    init_process_group(env, device)
    grid = Grid.build(tp=2, pp=2, device=device)

    # 2. the model: this pp rank's two virtual-stage chunks, muP-initialized, layout-independent
    model_cfg = ModelConfig(dim=64, n_layers=4, n_heads=4, vocab_size=256, base_dim=32)  # muP width x2
    optim_cfg = OptimConfig(name="lion", lr=2e-3, betas=[0.9, 0.99], weight_decay=0.1, warmup_steps=1,
                            schedule="constant", grad_clip=1.0, mup=True, impl="foreach")
    parallel_cfg = ParallelConfig(tp=2, pp=2, vpp=2, microbatches=4, zero=1)
    seq_len, batch_size = 32, 16  # global batch: 16 sequences = dp 2 x 4 micro-batches x 2
    mup = build_parametrization(model_cfg, optim_cfg)  # the role table, init stds, groups, forward scales
    chunks = build_chunks(model_cfg, grid, parallel_cfg.vpp, args.seed, scales=mup.scales, std_of=mup.std_of)
    chunks = [chunk.to(device) for chunk in chunks]
    named_params = {name: p for chunk in chunks for name, p in chunk.named_parameters()}  # global names
    specs = {name: spec for chunk in chunks for name, spec in param_specs(chunk).items()}

    # 3. activation offload: every saved activation of 1 KiB or more goes to host memory
    offload = ActivationOffload(OffloadConfig(backend="host", device_filter="all", min_bytes=1024, keep_last=0),
                                grid, device)
    for chunk in chunks:
        offload.attach(chunk)

    # 4. data parallelism with ZeRO-1 around Lion; muP's groups carry the per-parameter lr multipliers
    grads = DataParallelGrads(chunks, grid, parallel_cfg, shard=True)
    optimizer = ZeroOptimizer(grads, grid, lambda groups: make_optimizer(groups, optim_cfg, device),
                              param_groups(named_params, optim_cfg.weight_decay, mup.group_of))

    # 5. the interleaved 1F1B schedule over this rank's chunks
    micro_batch = batch_size // (grid.dp * parallel_cfg.microbatches)
    pipeline = PipelineRuntime(chunks, grid, schedule="1f1b", vpp=parallel_cfg.vpp,
                               microbatches=parallel_cfg.microbatches,
                               hidden_shape=hidden_shape(micro_batch, seq_len, model_cfg.dim, grid.tp, False))

    # 6. the loader: byte-level tokens of Python's standard library, prepared once (rank 0 first)
    if grid.rank != 0:
        dist.barrier()
    corpus = prepare_text(None, args.cache, val_fraction=0.02)
    if grid.rank == 0:
        dist.barrier()
    loader = Loader(corpus / "train.bin", corpus / "val.bin", seq_len, batch_size, parallel_cfg.microbatches,
                    grid.dp_rank, grid.dp, seed=args.seed, device=device)

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return chunks[-1].loss(logits, targets)  # called on the last stage only, which holds the head

    # 7. the loop
    losses, offloaded = [], 0
    for step in range(args.steps):
        apply_lr(optimizer, step, args.steps, optim_cfg)
        batch = loader.batch(step)  # [micro-batches, micro_batch, seq_len + 1] for this dp rank
        with offload.step():
            loss = pipeline.run(batch[:, :, :-1], batch[:, :, 1:], loss_fn, before_last_backward=grads.start_overlap)
        offloaded += int(offload.last_metrics["offload_written_bytes"])
        grads.finish()  # wait for the bucketed reduce-scatter over dp
        entries = optimizer.grad_entries()  # (name, this rank's averaged gradient piece)
        norm = global_grad_norm([(g, specs[n]) for n, g in entries], grid, dp_sharded=True)
        clip_by_norm([g for _, g in entries], optim_cfg.grad_clip, norm)
        optimizer.step()  # Lion on this rank's shard, then all-gather the weights over dp
        grads.zero_grad()
        if grid.dp_group is not None:
            dist.all_reduce(loss, group=grid.dp_group)
            loss /= grid.dp
        losses.append(float(loss))
        if grid.rank == 0:
            print(f"step {step + 1} loss {losses[-1]:.4f} grad_norm {float(norm):.3f}", flush=True)

    # 8. a checkpoint (safetensors shards under global names, the layout recorded), then a reload
    request = SaveRequest(args.steps, named_params, specs, named_state(optimizer, named_params),
                          rank_state={"step": args.steps, "loader": loader.state()},
                          meta={**layout_meta(grid, parallel_cfg.vpp, parallel_cfg.zero), **model_meta(model_cfg, mup.scales),
                                "optimizer": optim_cfg.name})
    path = save_checkpoint(Path(args.out) / "checkpoints", grid, request)
    fresh = build_chunks(model_cfg, grid, parallel_cfg.vpp, seed=args.seed + 1)  # other weights
    fresh_params = {name: p for chunk in fresh for name, p in chunk.named_parameters()}
    changed_before = sum(not torch.equal(fresh_params[n].cpu(), p.detach().cpu()) for n, p in named_params.items())
    load_params(ShardReader(path), fresh_params, specs, grid)
    mismatched = torch.tensor([sum(not torch.equal(fresh_params[n].cpu(), p.detach().cpu())
                                   for n, p in named_params.items())])
    dist.all_reduce(mismatched)
    offloaded_all = torch.tensor([offloaded])
    dist.all_reduce(offloaded_all)
    offload.close()
    loader.close()
    if grid.rank == 0:
        result = {"losses": losses, "checkpoint": str(path), "params_on_rank0": len(named_params),
                  "differed_before_reload_rank0": changed_before, "mismatched_after_reload": int(mismatched),
                  "offloaded_bytes": int(offloaded_all), "layout": grid.layout.describe()}
        (Path(args.out) / "result.json").write_text(json.dumps(result, indent=1))
        print(f"checkpoint {path}: reloaded, {int(mismatched)} mismatched tensors; "
              f"{int(offloaded_all)} activation bytes offloaded", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
