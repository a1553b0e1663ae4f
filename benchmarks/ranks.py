"""A benchmark's gloo world: spawn `world` processes (they meet through a file store in a temporary directory, no
ports), run `fn(rank, world, *args)` in each and collect the results by rank. A rank that raises sends its traceback
instead; the parent raises it and stops the others."""

import os
import tempfile
import traceback
from typing import Any, Callable, List

import torch.multiprocessing as mp


def _worker(rank: int, world: int, store: str, fn: Callable, args: tuple, queue) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        queue.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:  # the parent stops every rank and shows this one's traceback
        queue.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def spawn_world(world: int, fn: Callable, *args: Any, timeout: float = 3600.0) -> List[Any]:
    """[fn(rank, world, *args) for each rank], each computed in a process of its own (`fn` importable)."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        procs = [context.Process(target=_worker, args=(rank, world, os.path.join(tmp, "store"), fn, args, queue))
                 for rank in range(world)]
        for proc in procs:
            proc.start()
        try:
            for _ in procs:
                rank, status, result = queue.get(timeout=timeout)
                if status != "ok":
                    raise RuntimeError(f"rank {rank} failed:\n{result}")
                results[rank] = result
        finally:
            for proc in procs:
                proc.join(timeout=5 if len(results) == world else 0.1)
                if proc.is_alive():
                    proc.kill()
    return [results[rank] for rank in range(world)]
