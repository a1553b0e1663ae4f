"""Run a function on N gloo ranks in fresh processes and collect what each returns.

Ranks meet through a FileStore in a temporary directory (no fixed ports). Each worker
sets OMP_NUM_THREADS=1 and one torch thread (the machine has 2 cores). A failure in any
rank raises in the test with that rank's traceback.

Workers are forked from a server process that imported torch and plait once (multiprocessing's
forkserver, started on the first call): a spawned worker spends about 1.5 s of CPU importing
torch, and the suite starts several hundred of them. The server has no threads and no process
group; each worker takes the caller's environment and working directory as they are at the call.
"""

import os
import pickle
import socket
import tempfile
import traceback
from typing import Any, Callable, List

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on this host now (for tests that launch ranks or a rendezvous through a port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


PRELOAD = ["torch", "torch.distributed", "plait.train.trainer", "pytest"]  # imported once, in the fork server


def _worker(rank: int, world_size: int, store_path: str, fn: Callable, args: tuple, queue, env: dict,
            cwd: str) -> None:
    os.environ.clear()
    os.environ.update(env, OMP_NUM_THREADS="1")
    os.chdir(cwd)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # every rank done before any closes its connections: a rank that left at once could close a pair its peer
        # was still connecting in a group made last (gloo: "Connection closed by peer"; seen once in 20 forked starts)
        dist.barrier()
        # by value: through the queue a tensor travels as a shared-memory handle that the parent fetches from this
        # process, which may have exited by then (FileNotFoundError in the parent); plain pickle copies the bytes
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report every failure to the parent, with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world_size: int, fn: Callable, *args: Any, timeout: float = 300.0) -> List[Any]:
    """`fn(rank, world_size, *args)` on `world_size` gloo ranks; returns results in rank order.

    `fn` must be importable (a module-level function) and return picklable values
    (tensors are fine: they come back by value).
    """
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # read when the server starts (the first call); later calls: no effect
    queue = context.Queue()
    env, cwd = dict(os.environ), os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        processes = [context.Process(target=_worker, args=(r, world_size, store, fn, args, queue, env, cwd),
                                     daemon=True) for r in range(world_size)]
        for process in processes:
            process.start()
        results, errors = {}, []
        try:
            for _ in range(world_size):
                rank, status, value = queue.get(timeout=timeout)
                if status == "ok":
                    results[rank] = pickle.loads(value)
                else:
                    errors.append(f"rank {rank} failed:\n{value}")
                    break
        finally:
            for process in processes:
                process.join(timeout=5 if not errors else 0.5)
                if process.is_alive():
                    process.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
