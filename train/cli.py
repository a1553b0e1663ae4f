"""`plait-train`: the Hydra app over `Trainer` (also `python -m plait.train`, and under torchrun).

Bad settings end with one line on stderr and exit status 2, never a traceback.
"""

import json
import logging
import os
import sys
import time

import hydra
from omegaconf import DictConfig

from plait.data.corpus import DataError
from plait.launch.errors import LaunchError
from plait.offload.config import OffloadError, OffloadIOError
from plait.parallel.layout import LayoutError
from plait.parallel.pipeline.transport import PeerLost, PeerTimeout, TransportError
from plait.parallel.float8 import Float8Error
from plait.train.checkpoint import CheckpointError
from plait.train.config import ConfigError, load_config

USER_ERRORS = (ConfigError, DataError, LayoutError, LaunchError, CheckpointError, OffloadError, OffloadIOError,
               TransportError, Float8Error)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format="%(message)s", stream=sys.stdout)


def fail(message: str, code: int = 2, speak: bool = True, program: str = "plait-train", at_once: bool = False) -> None:
    """End with one line on stderr (when this rank speaks for all) and `code`; torchrun's summary gets it too.

    `at_once` (a lost peer): leave without joining background threads. A checkpoint writer may be waiting in a
    collective that the lost rank, or a survivor stuck behind it, never joins; joining it would keep this rank
    alive, and its peers waiting on it, until the launcher kills them all (torchrun: 30 s later). The save it
    abandons is a `.tmp-*` directory, never published, that the next run removes."""
    line = f"{program}: error: {message}"
    if speak:
        print(line, file=sys.stderr, flush=True)
    record_for_torchrun(line)
    if at_once:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def record_for_torchrun(line: str) -> None:
    """Under torchrun, leave the sentence in the worker's error file: the launcher's failure summary then
    shows it as the root cause instead of `<N/A>` (torch.distributed.elastic reads `message`)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    payload = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as handle:
            json.dump(payload, handle)
    except OSError:
        pass


PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Socket Timeout",
             "connection was closed")


def lost_a_peer(error: BaseException) -> bool:
    """A collective failed because another rank is gone (gloo's and NCCL's words for it), not a bug of ours."""
    import torch.distributed as dist

    distributed_error = getattr(dist, "DistError", ())
    return isinstance(error, PeerLost) or (distributed_error and isinstance(error, distributed_error)) or (
        isinstance(error, RuntimeError) and any(words in str(error) for words in PEER_LOST))


def timed_out(error: BaseException) -> bool:
    """A collective (gloo's words for it) or a shared-memory pipeline receive gave up waiting."""
    return isinstance(error, PeerTimeout) or isinstance(error, RuntimeError) and "Timed out waiting" in str(error)


def run(cfg: DictConfig) -> dict:
    """Train with `cfg` (or plan only, with train.dry_run=true); returns the last metrics.

    Every way a run ends reads as one line: a bad setting (rank 0 alone says it, every rank
    exits 2), a run-time failure (nan loss, a full disk, a lost peer: exit 2, earlier checkpoints
    intact), Ctrl-C (checkpoint if on, exit 130) and preemption (checkpoint, requeue status).
    """
    from plait.launch.env import detect
    from plait.launch.signals import INTERRUPT_EXIT_CODE, Interrupted, Preempted
    from plait.train.trainer import Trainer

    setup_logging(cfg.logging.level)
    if cfg.train.dry_run:  # plan only: shard shapes on the meta device, no process group
        from plait.train.plan import dry_run
        return dry_run(cfg)
    rank = detect().rank
    if rank != 0:  # only rank 0 logs progress; the others speak up for warnings and errors
        logging.getLogger("plait").setLevel(logging.WARNING)
    trainer = None
    try:
        trainer = Trainer(cfg)
        metrics = trainer.fit()
    except Interrupted as stop:
        end_process_group()
        saved = f"checkpoint {stop.path}; resume with train.resume=auto" if stop.path else "no checkpoint was written"
        fail(f"interrupted (Ctrl-C) after step {stop.step}; {saved}.", INTERRUPT_EXIT_CODE, rank == 0)
    except Preempted:  # checkpointed, leaving with the requeue status
        end_process_group()
        raise
    except KeyboardInterrupt:
        end_process_group()
        fail("interrupted (Ctrl-C) before a step finished; nothing was saved.", INTERRUPT_EXIT_CODE, rank == 0)
    except USER_ERRORS + (FloatingPointError,) as error:  # the same on every rank (settings, data, nan loss)
        end_process_group()
        fail(str(error), speak=rank == 0 or trainer is not None and not isinstance(error, FloatingPointError))
    except Exception as error:
        stuck = timed_out(error)
        if not (stuck or lost_a_peer(error)):
            raise
        end_process_group()
        step = getattr(trainer, "checkpoint_step", None)
        saved = f"checkpoints up to step {step} are intact" if step else "no checkpoint was written yet"
        what = str(error).splitlines()[0][:160]
        if stuck:
            fail(f"rank {rank} waited longer than the collective timeout ({what}) for another rank, which is stuck or "
                 f"far slower (parallel.timeout_s={cfg.parallel.timeout_s} while starting, parallel.train_timeout_s="
                 f"{cfg.parallel.train_timeout_s} after the first step: raise them if that rank is only slow); "
                 f"{saved}, resume with train.resume=auto.", at_once=True)
        fail(f"rank {rank} lost contact with another rank ({what}): that rank ended or was killed first and its own "
             f"log says why; {saved}, resume with train.resume=auto.", at_once=True)
    end_process_group(settle=True)
    return metrics


def end_process_group(settle: bool = False) -> None:
    """Destroy the process group this run made, while the interpreter is still whole.

    Left to interpreter exit, gloo's worker threads may still hold finished work whose
    tensors need the GIL during finalization: a rank then aborts (SIGABRT, "terminate called
    without an active exception") after a run that succeeded, and torchrun fails the job.
    With `settle` (a run that ended well) the ranks first meet at a barrier, so no rank tears
    its groups down while a peer's last exchange with it is still in flight.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if settle and dist.get_world_size() > 1:
            try:
                dist.barrier()
            except RuntimeError:  # a peer already gone: nothing is left to wait for
                pass
        dist.destroy_process_group()


@hydra.main(config_path="pkg://plait.configs", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def _one_line(error: BaseException) -> str:
    """Hydra/OmegaConf's multi-line composition error as one sentence (no key dumps, no hints)."""
    lines = []
    while error is not None:
        for line in str(error).splitlines():
            line = line.strip()
            if line.startswith("Config search path"):
                break
            if line and not line.startswith(("full_key", "reference_type", "object_type", "To append",
                                             "Set the environment")) and line not in lines:
                lines.append(line)
        error = error.__cause__
    text = "; ".join(lines)
    return text.replace(":; ", ": ").replace(".; ", ". ")


def compose(argv: list, program: str = "plait-train"):
    """The composed config of plain overrides, or one line and exit 2: a type error, an unknown key or a
    missing group option (`model=no-such`) never reaches the user as Hydra's multi-line text. Under
    torchrun only rank 0 says it (every rank exits 2)."""
    from plait.launch.env import detect

    try:
        return load_config([arg for arg in argv if not arg.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))])
    except Exception as error:  # any composition failure is the user's setting
        fail(_one_line(error), speak=detect().rank == 0, program=program)


def precheck(argv: list, program: str = "plait-train") -> None:
    """Compose once before Hydra's own app does; Hydra flags (--cfg, --multirun, ...) are left to Hydra."""
    if not any(arg.startswith("-") for arg in argv):
        compose(argv, program)


def main() -> None:
    """Console entry point."""
    precheck(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
