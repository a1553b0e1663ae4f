"""A mixture of experts (`model.moe_experts`) against its peer: the block, and what training reaches.

1. Block: plait's `MoE` (sort the (token, choice) rows by expert, each expert on its rows, gather back, weight,
   sum) against transformers' `MixtralSparseMoeBlock` (a mask per expert, `index_add_` back) on the same weights,
   forward and backward, round by round, medians with min and max; the outputs are checked equal first.
2. Training: the default job (model=tiny, the standard library's text) dense, and with 4 experts routed top-1
   (the same matmul FLOPs per token, plus the router's), stepped in turn in one process; validation loss every
   `--eval-every` steps, tokens/s, and a PNG of the validation curves.
3. Balancing (`--balancing`): 8 experts routed top-2, trained with no balancing, Switch's balancing loss
   (Megatron's default), the same loss per sequence (DeepSeek-V3's), DeepSeek-V3's routing bias without a loss
   (at its rate 1e-3, and at 1e-2), and the loss with the bias, stepped in turn; the max violation of the experts'
   loads (busiest over mean, less 1) over the last third of the steps, and validation loss.

    python benchmarks/moe.py --out moe.json --plot moe.png
    python benchmarks/moe.py --steps 0 --balancing --out moe_balancing.json --balancing-plot moe_balancing.png
    python benchmarks/moe.py --device cuda --dim 2048 --tokens 8192 --steps 0 --out moe.json   # the block on a GPU
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from in_turn import plot_validation, train_in_turn  # noqa: E402
from report import write_json  # noqa: E402


def block_contenders(dim: int, ffn: int, experts: int, top_k: int, device: torch.device):
    """{name: module}: plait's MoE and transformers' Mixtral block holding the same weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from plait.train.build import build_model
    from plait.train.config import ModelConfig
    from plait.train.export import to_hf

    cfg = ModelConfig(dim=dim, n_layers=1, n_heads=max(1, dim // 64), ffn_dim=ffn, moe_experts=experts,
                      moe_top_k=top_k, moe_aux_loss=0.0)
    model = build_model(cfg, seed=0)
    ours = model.layers["0"].mlp
    hf_config = MixtralConfig(hidden_size=dim, intermediate_size=ffn, num_local_experts=experts,
                              num_experts_per_tok=top_k, router_jitter_noise=0.0)
    theirs = MixtralSparseMoeBlock(hf_config)
    named = {f"layers.0.mlp.{name}": param.detach() for name, param in ours.named_parameters()}
    model_meta = {"dim": dim, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_heads, "ffn_dim": ffn,
                  "moe_experts": experts, "tie_embeddings": False}
    hf = {name.split("block_sparse_moe.", 1)[1]: tensor for name, tensor in to_hf(model_meta, named).items()}
    with torch.no_grad():
        theirs.gate.weight.copy_(hf["gate.weight"])
        if hasattr(theirs.experts, "gate_up_proj"):  # transformers 5: each block's experts in two 3-D tensors
            theirs.experts.gate_up_proj.copy_(torch.stack([torch.cat([hf[f"experts.{e}.w1.weight"],
                                                                      hf[f"experts.{e}.w3.weight"]])
                                                           for e in range(experts)]))
            theirs.experts.down_proj.copy_(torch.stack([hf[f"experts.{e}.w2.weight"] for e in range(experts)]))
        else:  # transformers 4 (a GPU image's): one module per expert, the Hub's names
            theirs.load_state_dict({name: tensor for name, tensor in hf.items()})
    return {"plait MoE": ours.to(device), "transformers Mixtral block": theirs.to(device)}


def output_of(module, x: torch.Tensor) -> torch.Tensor:
    out = module(x)
    return out[0] if isinstance(out, tuple) else out  # transformers 4's block also returns its router logits


def time_blocks(args, device: torch.device):
    table = block_contenders(args.dim, args.ffn, args.experts, args.top_k, device)
    x = torch.randn(1, args.tokens, args.dim, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        outputs = [output_of(module, x) for module in table.values()]
        difference = float((outputs[0] - outputs[1]).abs().max() / outputs[1].abs().max())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = {name: [] for name in table}
    for _ in range(1 + args.rounds):  # the first round warms up
        for name, module in table.items():
            inputs = x.clone().requires_grad_()
            sync()
            start = time.perf_counter()
            output_of(module, inputs).square().mean().backward()
            sync()
            seconds[name].append(time.perf_counter() - start)
    return {name: values[1:] for name, values in seconds.items()}, difference


VARIANTS = {"dense": [], "moe 4 experts top-1": ["model.moe_experts=4", "model.moe_top_k=1"]}
EIGHT = ["model.moe_experts=8", "model.moe_top_k=2"]
BALANCING = {  # name: (its key in the summary, overrides)
    "none": ("none", EIGHT + ["model.moe_aux_loss=0"]),
    "balancing loss 0.01": ("loss", EIGHT + ["model.moe_aux_loss=0.01"]),
    "per-sequence loss 0.01": ("seq_loss", EIGHT + ["model.moe_aux_loss=0.01", "model.moe_aux_loss_type=seq_aux_loss"]),
    "routing bias 1e-3": ("bias_1e-3", EIGHT + ["model.moe_aux_loss=0", "model.moe_bias_update_rate=1e-3"]),
    "routing bias 1e-2": ("bias_1e-2", EIGHT + ["model.moe_aux_loss=0", "model.moe_bias_update_rate=1e-2"]),
    "loss and bias 1e-3": ("both", EIGHT + ["model.moe_aux_loss=0.01", "model.moe_bias_update_rate=1e-3"])}


def plot_violation(curves: Dict[str, Dict], path: str, window: int = 10) -> None:
    """Each balancing variant's max violation per step (a running mean over `window` steps) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        values = curve["moe_max_violation"]
        smooth = [statistics.mean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]
        axis.plot(range(1, len(values) + 1), smooth, label=name)
    axis.set_xlabel("step")
    axis.set_ylabel(f"max violation (busiest / mean - 1, mean of {window} steps)")
    axis.set_title("8 experts top-2, model=tiny on the standard library's text")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def compare_balancing(args) -> Dict:
    """The balancing variants stepped in turn: {variant: curve}, a table, and the summary's figures."""
    variants = {name: overrides for name, (_, overrides) in BALANCING.items()}
    curves = train_in_turn(variants, args.balancing_steps, args.eval_every, Path(args.run_root) / "balancing",
                           metrics=("moe_max_violation", "moe_balance"))
    tail = max(1, args.balancing_steps // 3)
    print(f"{'balancing':>22} {'max violation':>14} {'balance loss':>13} {'val_loss':>9} {'tok/s median':>13}")
    summary = {}
    for name, curve in curves.items():
        violation = statistics.mean(curve["moe_max_violation"][-tail:])
        balance = statistics.mean(curve["moe_balance"][-tail:])
        print(f"{name:>22} {violation:>14.3f} {balance:>13.4f} {curve['val'][-1][1]:>9.4f} "
              f"{statistics.median(curve['tokens_per_s']):>13,.0f}")
        key = BALANCING[name][0]
        summary.update({f"max_violation_{key}": violation, f"val_loss_{key}": curve["val"][-1][1]})
    if args.balancing_plot:
        plot_violation(curves, args.balancing_plot)
    return {"curves": curves, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1408)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=200, help="training steps of each run (0: the block only)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--balancing", action="store_true", help="also compare the ways to balance the experts")
    parser.add_argument("--balancing-steps", type=int, default=150)
    parser.add_argument("--balancing-plot", default=None, help="a PNG of the max violation per step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where the block runs (cuda: timed with a synchronize)")
    parser.add_argument("--run-root", default="outputs/bench-moe")
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    seconds, difference = time_blocks(args, torch.device(args.device))
    base = statistics.median(seconds["transformers Mixtral block"])
    print(f"MoE block forward + backward: {args.tokens} tokens, dim {args.dim}, ffn {args.ffn}, {args.experts} "
          f"experts top-{args.top_k} (outputs equal to {difference:.1e} relative):")
    print(f"{'contender':>28} {'ms (min-max)':>20} {'x transformers':>15}")
    rows = []
    for name, values in seconds.items():
        median = statistics.median(values)
        rows.append({"contender": name, "seconds": {"median": median, "min": min(values), "max": max(values)},
                     "vs_transformers": median / base})
        print(f"{name:>28} {1e3 * median:>9.1f} ({1e3 * min(values):.1f}-{1e3 * max(values):.1f}) "
              f"{median / base:>15.3f}")
    summary = {"block_vs_transformers": rows[0]["vs_transformers"], "outputs_relative_difference": difference}
    curves = {}
    if args.steps:
        curves = train_in_turn(VARIANTS, args.steps, args.eval_every, Path(args.run_root))
        dense, moe = curves.values()
        print(f"{'variant':>22} {'parameters':>11} {'val_loss':>9} {'tok/s median':>13}")
        for name, curve in curves.items():
            print(f"{name:>22} {curve['params'] / 1e6:>10.2f}M {curve['val'][-1][1]:>9.4f} "
                  f"{statistics.median(curve['tokens_per_s']):>13,.0f}")
        summary.update({"val_loss_dense": dense["val"][-1][1], "val_loss_moe": moe["val"][-1][1],
                        "throughput_moe_vs_dense": statistics.median(moe["tokens_per_s"])
                        / statistics.median(dense["tokens_per_s"])})
        if args.plot:
            plot_validation(curves, args.plot, with_params=True)
    balancing = compare_balancing(args) if args.balancing else {"curves": {}, "summary": {}}
    summary.update(balancing["summary"])
    if args.out:
        write_json(args.out, {"benchmark": "moe", "device": args.device, "settings": vars(args), "rows": rows,
                              "training": curves, "balancing": balancing["curves"], "summary": summary})


if __name__ == "__main__":
    main()
