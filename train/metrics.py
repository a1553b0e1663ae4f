"""Training metrics and where they go: console (progress bar and lines), JSONL, wandb, TensorBoard.

FLOPs per token (for MFU) follow PaLM's appendix: 6 N for the weight matmuls forward and
backward (N = parameters in matmuls, the LM head included, the embedding lookup not),
plus 12 L H Q T for attention scores and values (L layers, H heads of size Q, T tokens
of context; 6 L H (Q + V) T under latent attention, whose query-key and value sizes differ). Only rank 0 writes.
"""

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from plait.train.config import ModelConfig, ffn_dim, kv_heads, latent_dims

log = logging.getLogger("plait")


def attention_params(cfg: ModelConfig) -> int:
    """Weights of one attention layer's matmuls: fused Q|K|V and output, or latent attention's projections."""
    if cfg.attention == "mla":
        dims, heads = latent_dims(cfg), cfg.n_heads
        queries = dims.q_rank * (cfg.dim + heads * dims.qk) if dims.q_rank else cfg.dim * heads * dims.qk
        latent = cfg.dim * (dims.kv_rank + dims.rope) + dims.kv_rank * heads * (dims.nope + dims.v)
        return queries + latent + heads * dims.v * cfg.dim
    head_dim = cfg.dim // cfg.n_heads
    return cfg.dim * (cfg.n_heads + 2 * kv_heads(cfg)) * head_dim + cfg.n_heads * head_dim * cfg.dim


def qk_and_v_width(cfg: ModelConfig) -> int:
    """Summed over heads, the query-key size plus the value size: what one token's scores and weighted values cost
    per token of context (H (Q + Q) = 2 dim for multi-head attention; the values' padding under MLA is not counted)."""
    if cfg.attention == "mla":
        dims = latent_dims(cfg)
        return cfg.n_heads * (dims.qk + dims.v)
    return 2 * cfg.dim


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in each token's matmuls (the embedding lookup does not; of a mixture of experts,
    the router, the k experts the token is routed to, and a shared expert and its gate; of each multi-token
    prediction depth, its block, its projection and the head again)."""
    attention = attention_params(cfg)
    mlp = 3 * cfg.dim * ffn_dim(cfg)
    if cfg.moe_experts:
        mlp = cfg.moe_top_k * mlp + cfg.dim * cfg.moe_experts
        mlp += (3 * cfg.moe_shared_ffn_dim + int(cfg.moe_shared_gate)) * cfg.dim if cfg.moe_shared_ffn_dim else 0
    blocks = cfg.n_layers * (attention + mlp) + cfg.dim * cfg.vocab_size
    mtp = cfg.mtp_layers * (attention + mlp + 2 * cfg.dim * cfg.dim + cfg.dim * cfg.vocab_size)  # block, proj, head
    return blocks + mtp


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 6 L H (Q + V) T, the second 12 L H Q T for multi-head attention (forward and
    backward); multi-token prediction's depths count as layers (each adds its block, projection and a pass through
    the head)."""
    return 6.0 * matmul_params(cfg) + 6.0 * (cfg.n_layers + cfg.mtp_layers) * qk_and_v_width(cfg) * seq_len


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def format_line(step: int, total: int, metrics: Dict[str, float]) -> str:
    """`step 10/400 | loss 2.3141 | lr 3.00e-03 | ...` (the console form of a metrics record)."""
    parts = [f"step {step}/{total}"]
    for key, value in metrics.items():
        if key == "step":
            continue
        if key in ("lr",):
            parts.append(f"{key} {value:.2e}")
        elif key in ("tokens_per_s",):
            parts.append(f"tok/s {value:,.0f}")
        elif key in ("mfu",):
            parts.append(f"mfu {100 * value:.2f}%")
        elif key in ("loss_scale",):
            parts.append(f"{key} {value:g}")
        elif key.endswith("bytes"):
            parts.append(f"{key[:-6]} {value / 2**20:.0f}MiB")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
        else:
            parts.append(f"{key} {value}")
    return " | ".join(parts)


class MetricsSink:
    """Writes metrics records on rank 0: JSONL always, console lines, wandb/TensorBoard if enabled."""

    def __init__(self, run_dir: Path, total_steps: int, enabled: bool, progress: bool = True,
                 wandb_cfg: Optional[Any] = None, tensorboard: bool = False, config: Optional[dict] = None):
        self.enabled, self.total = enabled, total_steps
        self.jsonl = None
        self.bar = None
        self.wandb = None
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True, leave=False)
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=wandb_cfg.project, name=wandb_cfg.name, mode=wandb_cfg.mode,
                                    dir=str(run_dir), config=config)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def forget_after(self, step: int) -> None:
        """Drop the JSONL records past `step` (a resumed run trains those steps again), atomically."""
        if self.jsonl is None:
            return
        path = Path(self.jsonl.name)
        self.jsonl.close()
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
        self.jsonl = open(path, "a", buffering=1)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def write(self, step: int, metrics: Dict[str, float], console: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics, "time": time.time()}
        self.jsonl.write(json.dumps(record) + "\n")
        if console:
            line = format_line(step, self.total, metrics)
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, flush=True)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()
