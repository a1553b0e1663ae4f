"""Where am I running: torchrun, Slurm, or a single process; and the process group for it.

`detect()` reads the launcher's variables (torchrun's RANK/LOCAL_RANK/WORLD_SIZE, or
Slurm's SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS with the head node from the node list),
`check_world_size` compares the world size with the tp x pp (x dp) layout before any
process group exists, and `init_process_group` joins the group with a timeout.

Restarts under torchrun (`--max-restarts`): the elastic agent keeps its store between
rounds, and the default env:// initialization reuses the same keys, so restarted gloo
workers read the dead workers' addresses ("Gloo connectFullMesh failed"). Each rank
therefore counts its own rounds on the agent store and joins on a PrefixStore named after
its round; every rank of a round is a restarted worker, so they all agree on the name.
"""

import datetime
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import List, Mapping, Optional

import torch
import torch.distributed as dist

from plait.launch.errors import LaunchError
from plait.parallel.layout import Layout, LayoutError

log = logging.getLogger("plait")


@dataclass(frozen=True)
class ProcessEnv:
    """This process's rank, local rank and world size, who launched it, and where rank 0 listens."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launcher: str = "single"  # single | torchrun | slurm
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    run_id: Optional[str] = None  # torchrun's run id or Slurm's job id: the same on every rank
    restart_count: int = 0  # torchrun's TORCHELASTIC_RESTART_COUNT (this agent's restarts so far)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.launcher != "single"


def expand_hostlist(nodelist: str) -> List[str]:
    """Slurm's compressed node list ("gpu[01-03,07],cpu1") as host names, in order.

    `scontrol show hostnames` does the same; this pure version works where scontrol
    is not on PATH (inside containers) and in tests.
    """
    hosts, depth, start = [], 0, 0
    parts = []
    for index, char in enumerate(nodelist + ","):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(nodelist[start:index])
            start = index + 1
    for part in filter(None, parts):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            low, _, high = item.partition("-")
            for number in range(int(low), int(high or low) + 1):
                hosts.append(f"{prefix}{str(number).zfill(len(low))}{suffix}")
    return hosts


def head_node(nodelist: str) -> str:
    """The first host of a Slurm node list (via `scontrol show hostnames` when available)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=10, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_hostlist(nodelist)[0]


def detect(environ: Optional[Mapping[str, str]] = None) -> ProcessEnv:
    """Read the launcher's variables: torchrun's RANK/WORLD_SIZE first, then Slurm's, else one process.

    Under `srun torchrun` both sets exist and torchrun's win (one Slurm task per node
    runs many workers). Under `srun python -m plait.train` (one task per process) the
    Slurm variables give the rank and the head node gives MASTER_ADDR; the port is
    MASTER_PORT when set, else derived from the job id so jobs sharing a node differ.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        run_id = env.get("TORCHELASTIC_RUN_ID")
        return ProcessEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "torchrun",
                          env.get("MASTER_ADDR"), int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None,
                          run_id if run_id and run_id != "none" else None,
                          int(env.get("TORCHELASTIC_RESTART_COUNT", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        job_id = env.get("SLURM_JOB_ID")
        addr = env.get("MASTER_ADDR") or head_node(env.get("SLURM_JOB_NODELIST", "localhost"))
        port = int(env.get("MASTER_PORT") or 20000 + int(job_id or 0) % 20000)
        return ProcessEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                          "slurm", addr, port, job_id)
    return ProcessEnv(run_id=env.get("SLURM_JOB_ID"))


def check_world_size(world_size: int, tp: int, pp: int, dp: Optional[int] = None) -> Layout:
    """The layout for `world_size` ranks, or a LayoutError naming parallel.tp/pp/dp and the fix.

    Call this before any process group is made, so a mismatch costs no rendezvous.
    """
    return Layout.infer(world_size, tp, pp, dp)


def pick_device(requested: str, local_rank: int) -> torch.device:
    """cuda:<local_rank> when CUDA is there (or asked for), else the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LaunchError("train.device=cuda but CUDA is not available; use train.device=cpu or auto.")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def pick_backend(requested: str, device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for the CPU, unless parallel.backend names one."""
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise LaunchError("parallel.backend=nccl needs CUDA devices; use parallel.backend=gloo or auto on the CPU.")
    return requested


def round_store(env: ProcessEnv, timeout: datetime.timedelta) -> dist.Store:
    """This restart round's store: a prefix of the launcher's store named after the round.

    Each rank adds 1 to its own counter on the shared store; after k restarts every rank
    reads k + 1, so all ranks of one round meet under the same fresh prefix.
    """
    use_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "False") == "True"
    store = dist.TCPStore(env.master_addr, env.master_port, world_size=None,
                          is_master=env.rank == 0 and not use_agent_store, timeout=timeout,
                          wait_for_workers=False, multi_tenant=True)
    round_number = store.add(f"plait/restarts/rank{env.rank}", 1)
    return dist.PrefixStore(f"plait/round{round_number}", store)  # keys: plait/round<n>/<key>


def init_process_group(env: ProcessEnv, device: torch.device, backend: str = "auto",
                       timeout_s: int = 600) -> None:
    """Initialize torch.distributed once for a multi-process run (NCCL on CUDA, gloo on CPU).

    The process group joins on this restart round's store (see `round_store`), so the same
    code works for the first round and for every torchrun restart, with gloo and NCCL.
    """
    if not env.distributed or dist.is_initialized():
        return
    backend = pick_backend(backend, device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if env.master_addr is None or env.master_port is None:
        raise LaunchError(f"{env.launcher} gave rank {env.rank} no MASTER_ADDR/MASTER_PORT; set both to rank 0's "
                          f"address and a free port.")
    store = round_store(env, timeout)
    dist.init_process_group(backend=backend, store=store, rank=env.rank, world_size=env.world_size,
                            timeout=timeout, device_id=device if device.type == "cuda" else None)
    log.info("process group: %s, world %d (%s)", backend, env.world_size, env.launcher)


def check_layout(env: ProcessEnv, tp: int, pp: int, dp: Optional[int] = None) -> Layout:
    """`check_world_size` for this process's world, re-raised with the launcher in the sentence."""
    try:
        return check_world_size(env.world_size, tp, pp, dp)
    except LayoutError as error:
        raise LayoutError(f"{error} (this {env.launcher} run has {env.world_size} processes)") from None
