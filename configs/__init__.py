"""plait's Hydra config tree (package data, so `pkg://plait.configs` works from anywhere)."""
