"""Context parallelism: plait's ring and Ulysses attention against torch's `context_parallel`, and how much
of the ring's communication hides behind its compute.

For each cp in `--cp` the script spawns cp gloo ranks (no ports) and times, round by round so
load swings hit every contender alike, forward + backward of causal attention over `--seq`
tokens (`--heads` x `--head-dim`, fp32, batch 1), each rank holding its zigzag share:

- `ring`: `plait.parallel.context.ring_attention` (K/V round the ring, sends posted before
  each block's compute);
- `ring-compute`: the same blocks with the K/V already local (no message): the ring's compute;
- `ring-comm`: the ring's messages alone (K/V each step, the grads of K/V in the backward);
- `ulysses`: `ulysses_attention` (all-to-all over heads);
- `torch`: `torch.distributed.tensor.experimental.context_parallel` around SDPA, where it runs
  (on CPU torch 2.13 has no sharding rule for its CPU flash kernel: the row says why);
- `one process` (timed before the ranks start): SDPA over the whole sequence.

The communication hidden behind compute is 1 - (ring - ring-compute) / ring-comm. Times are
medians of `--rounds` (min, max), the slowest rank's.

    python benchmarks/context_parallel.py --out context_parallel.json
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from report import write_json  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SCALE_OF = lambda head_dim: head_dim ** -0.5  # noqa: E731


def tensors(args, cp, rank, requires_grad=True):
    from plait.parallel.context import split_sequence

    generator = torch.Generator().manual_seed(0)
    shape = (1, args.heads, args.seq, args.head_dim)
    whole = [torch.randn(shape, generator=generator) for _ in range(4)]  # q, k, v, out grad
    if cp == 1:
        return whole
    local = [split_sequence(t, cp, rank, dim=2).contiguous() for t in whole]
    for t in local[:3]:
        t.requires_grad_(requires_grad)
    return local


def ring_compute(q, k, v, out_grad, scale, cp):
    """`ring_attention` itself with each message replaced by a copy of the local tensor: the ring's
    compute (the same blocks, masks, merges and autograd) with no communication."""
    from plait.parallel import context

    real = context._exchange
    context._exchange = lambda send, next_rank, prev_rank, group: (send.clone(), [])
    try:
        context.ring_attention(q, k, v, scale=scale, causal=True, group=None, ring=list(range(cp))).backward(out_grad)
    finally:
        context._exchange = real


def ring_comm(k, v, cp, rank, group):
    """The ring's messages alone: K/V forward (cp - 1 hops), K/V and their grads backward (cp hops)."""
    from plait.parallel.context import _exchange

    ring = list(range(cp))
    kv = torch.stack([k, v]).contiguous()
    nxt, prv = ring[(rank + 1) % cp], ring[(rank - 1) % cp]
    for _ in range(2):  # forward, then the backward's K/V
        for _ in range(cp - 1):
            buffer, works = _exchange(kv, nxt, prv, group)
            for work in works:
                work.wait()
    grads = torch.zeros_like(kv)
    for _ in range(cp):
        buffer, works = _exchange(grads, nxt, prv, group)
        for work in works:
            work.wait()


def torch_context_parallel(args, cp):
    """A closure running torch's context_parallel SDPA forward + backward, or the reason it cannot run."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    mesh = init_device_mesh("cpu", (cp,), mesh_dim_names=("cp",))
    q, k, v, out_grad = tensors(args, 1, 0)

    def run():
        buffers = [t.clone() for t in (q, k, v, out_grad)]
        with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2, 2]):
            qs, ks, vs = (t.detach().requires_grad_() for t in buffers[:3])  # the buffers are restored on exit
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).backward(buffers[3])
    try:
        run()
        return run, None
    except Exception as error:  # NotImplementedError on CPU: no sharding rule for the CPU flash kernel
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"


def timed(fn):
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def worker(rank, cp, store, args, queue):
    from plait.parallel.context import ring_attention, ulysses_attention

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=cp)
    scale = SCALE_OF(args.head_dim)
    q, k, v, out_grad = tensors(args, cp, rank)

    def ring():
        ring_attention(q, k, v, scale=scale, causal=True, group=None, ring=list(range(cp))).backward(out_grad)

    def ulysses():
        ulysses_attention(q, k, v, scale=scale, causal=True, group=None, cp=cp).backward(out_grad)

    plain = [t.detach() for t in (q, k, v, out_grad)]
    contenders = {"ring": ring, "ring-compute": lambda: ring_compute(q, k, v, out_grad, scale, cp),
                  "ring-comm": lambda: ring_comm(plain[1], plain[2], cp, rank, None), "ulysses": ulysses}
    torch_run, torch_reason = torch_context_parallel(args, cp)
    if torch_run is not None:
        contenders["torch"] = torch_run
    times = {name: [] for name in contenders}
    for round_index in range(args.warmup + args.rounds):
        for name, fn in contenders.items():
            elapsed = timed(fn)
            if round_index >= args.warmup:
                times[name].append(elapsed)
    dist.destroy_process_group()
    if rank == 0:
        queue.put((times, torch_reason))


def one_process(args):
    q, k, v, out_grad = tensors(args, 1, 0)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    samples = []
    for round_index in range(args.warmup + args.rounds):
        start = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE_OF(args.head_dim)).backward(out_grad)
        if round_index >= args.warmup:
            samples.append(time.perf_counter() - start)
    return samples


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, summary = [], {}
    base = one_process(args)
    rows.append(dict(cp=1, contender="one process", median_s=statistics.median(base), min_s=min(base), max_s=max(base)))
    context = mp.get_context("spawn")
    lines = [f"{'cp':>3} {'contender':<13} {'median ms':>10} {'min':>8} {'max':>8}",
             f"{1:>3} {'one process':<13} {1e3 * statistics.median(base):>10.1f} {1e3 * min(base):>8.1f} "
             f"{1e3 * max(base):>8.1f}"]
    for cp in args.cp:
        queue = context.Queue()
        with tempfile.TemporaryDirectory() as tmp:
            store = os.path.join(tmp, "store")
            processes = [context.Process(target=worker, args=(r, cp, store, args, queue)) for r in range(cp)]
            for process in processes:
                process.start()
            times, torch_reason = queue.get(timeout=1800)
            for process in processes:
                process.join()
        medians = {name: statistics.median(samples) for name, samples in times.items()}
        for name, samples in times.items():
            rows.append(dict(cp=cp, contender=name, median_s=medians[name], min_s=min(samples), max_s=max(samples)))
            lines.append(f"{cp:>3} {name:<13} {1e3 * medians[name]:>10.1f} {1e3 * min(samples):>8.1f} "
                         f"{1e3 * max(samples):>8.1f}")
        if torch_reason:
            rows.append(dict(cp=cp, contender="torch", skipped=torch_reason))
            lines.append(f"{cp:>3} {'torch':<13} does not run here: {torch_reason}")
        exposed = medians["ring"] - medians["ring-compute"]
        hidden = max(0.0, min(1.0, 1 - exposed / medians["ring-comm"])) if medians["ring-comm"] > 0 else 1.0
        summary[f"cp{cp}_ring_comm_hidden"] = hidden
        summary[f"cp{cp}_ring_over_one_process"] = medians["ring"] / statistics.median(base)
        summary[f"cp{cp}_ulysses_over_ring"] = medians["ulysses"] / medians["ring"]
        if "torch" in medians:
            summary[f"cp{cp}_torch_over_ring"] = medians["torch"] / medians["ring"]
        lines.append(f"    cp={cp}: ring communication hidden {100 * hidden:.0f}% (ring {1e3 * medians['ring']:.1f} ms, "
                     f"its compute {1e3 * medians['ring-compute']:.1f}, its messages {1e3 * medians['ring-comm']:.1f}); "
                     f"ulysses / ring {medians['ulysses'] / medians['ring']:.2f}")
    print("\n".join(lines))
    payload = {"benchmark": "context_parallel", "device": "cpu, gloo ranks, 1 thread each",
               "settings": dict(seq=args.seq, heads=args.heads, head_dim=args.head_dim, rounds=args.rounds),
               "rows": rows, "summary": summary}
    if args.out:
        write_json(args.out, payload)


if __name__ == "__main__":
    main()
