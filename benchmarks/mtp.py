"""Multi-token prediction (`model.mtp_layers`) against next-token training alone: what it costs and what it reaches.

The default job (model=tiny, the standard library's text), trained with next-token prediction alone (the peer:
what every other run of plait, Megatron-LM or torchtitan trains) and with DeepSeek-V3's MTP at one depth, weight
0.1 (Megatron's default) and 0.3 (DeepSeek-V3's first 10T tokens), and with two depths; the trainers stepped in
turn in one process. Validation loss (next-token alone, comparable across the runs) every `--eval-every` steps,
tokens/s against the peer's, the MTP loss over the last tenth of the steps, and a PNG of the validation curves.

    python benchmarks/mtp.py --out docs/mtp.json --plot docs/img/mtp_vs_next_token.png
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from in_turn import plot_validation, train_in_turn, training_line, training_rows  # noqa: E402
from report import write_json  # noqa: E402

VARIANTS = {"next token": ["model.mtp_layers=0"],
            "mtp 1 x 0.1": ["model.mtp_layers=1", "model.mtp_weight=0.1"],
            "mtp 1 x 0.3": ["model.mtp_layers=1", "model.mtp_weight=0.3"],
            "mtp 2 x 0.3": ["model.mtp_layers=2", "model.mtp_weight=0.3"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--run-root", default="outputs/bench-mtp")
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    curves = train_in_turn(VARIANTS, args.steps, args.eval_every, Path(args.run_root), metrics=("mtp_loss",))
    tail = max(1, args.steps // 10)
    print(f"{'variant':>18} {'parameters':>11} {'val_loss':>9} {'x peer':>7} {'tok/s':>8} {'x peer':>7} "
          f"{'mtp_loss':>9}")
    rows = training_rows(curves, "next token")
    for row in rows:
        mtp = [value for value in curves[row["variant"]]["mtp_loss"][-tail:] if value is not None]
        row["mtp_loss_last_tenth"] = statistics.mean(mtp) if mtp else None
        print(f"{training_line(row, 18)} {row['mtp_loss_last_tenth'] or float('nan'):>9.4f}")
    if args.plot:
        plot_validation(curves, args.plot, with_params=True)
    if args.out:
        write_json(args.out, {"benchmark": "mtp", "device": "cpu", "settings": vars(args), "rows": rows,
                              "training": curves})


if __name__ == "__main__":
    main()
