"""plait.launch: where am I running, and launching torchrun and Slurm jobs."""
