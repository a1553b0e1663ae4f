"""plait.launch: where am I running (torchrun, Slurm, one process), torchrun and sbatch commands, signals.

Public names are listed in `__all__`; modules and names not listed are private and may
change. Construction takes explicit arguments (a config dataclass, a `Grid` or plain
values), never hidden globals. Names are imported lazily on first use.
"""

from typing import TYPE_CHECKING

from plait.common.exports import lazy_exports

_EXPORTS = {
    # the process environment
    "ProcessEnv": "plait.launch.env",
    "detect": "plait.launch.env",
    "pick_device": "plait.launch.env",
    "init_process_group": "plait.launch.env",
    "check_layout": "plait.launch.env",
    # commands
    "LaunchConfig": "plait.launch.config",
    "LaunchError": "plait.launch.errors",
    "torchrun_command": "plait.launch.commands",
    "sbatch_script": "plait.launch.commands",
    "launch": "plait.launch.submit",
    # runs
    "resolve_run_dir": "plait.launch.rundir",
    "PreemptionFlag": "plait.launch.signals",
    "Preempted": "plait.launch.signals",
    "Interrupted": "plait.launch.signals",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # static tools see real imports; at run time they happen on first access
    from plait.launch.commands import sbatch_script, torchrun_command
    from plait.launch.config import LaunchConfig
    from plait.launch.env import ProcessEnv, check_layout, detect, init_process_group, pick_device
    from plait.launch.errors import LaunchError
    from plait.launch.rundir import resolve_run_dir
    from plait.launch.signals import Interrupted, Preempted, PreemptionFlag
    from plait.launch.submit import launch


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
