"""`plait schedule --pp 4 --vpp 2 --microbatches 8`: build, validate, simulate and draw a schedule.

Prints the timeline as text with the simulated step time and bubble next to the theory
((p-1)/m for 1F1B, (p-1)/(v m) interleaved, (p-1)(F+I-W)/(m(F+I+W)) for ZB-H1 with I the
input half of the backward), the activations each rank holds at its peak, and writes the
PNG to `--out`. `--schedule zbv` or `dualpipev` run two chunks per rank (a V).
"""

import argparse
import sys
from typing import List, Optional

from plait.parallel.pipeline.plot import render_text, save_png
from plait.parallel.pipeline.schedule import (BUILDERS, ScheduleError, build_schedule, chunks_per_rank, placement,
                                              schedule_name)
from plait.parallel.pipeline.simulate import peak_live_microbatches, simulate, validate


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="plait schedule", description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, required=True, help="pipeline ranks p")
    parser.add_argument("--vpp", type=int, default=1, help="chunks per rank v (interleaved when > 1)")
    parser.add_argument("--microbatches", "-m", type=int, required=True, help="micro-batches m per step")
    parser.add_argument("--schedule", default="1f1b", help=f"{' | '.join(BUILDERS)} (1f1b interleaves when --vpp > 1)")
    parser.add_argument("--forward", type=float, default=1.0, help="cost of one rank's forward (all its chunks)")
    parser.add_argument("--backward", type=float, default=2.0, help="cost of one rank's whole backward")
    parser.add_argument("--weight", type=float, default=None,
                        help="the weight-grad part W of --backward (default half of it)")
    parser.add_argument("--out", default=None, help="PNG path (default schedule_<name>_pp<p>_vpp<v>_m<m>.png)")
    parser.add_argument("--no-png", action="store_true", help="print the text timeline only")
    return parser.parse_args(argv)


def theory(name: str, pp: int, vpp: int, m: int, forward: float, backward: float, weight: float) -> Optional[float]:
    """The bubble the papers derive for this schedule (None where none is given here)."""
    if name in ("gpipe", "1f1b"):
        return (pp - 1) / m
    if name == "interleaved":
        return (pp - 1) / (vpp * m)
    if name == "zbh1":
        return (pp - 1) * (forward + backward - 2 * weight) / (m * (forward + backward))
    return None


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    try:
        name = schedule_name(args.schedule, args.vpp)
        vpp = chunks_per_rank(name, args.vpp)
        actions = build_schedule(name, args.pp, vpp, args.microbatches)
        validate(actions, args.pp, vpp, args.microbatches, style=placement(name))
    except ScheduleError as error:
        print(f"plait schedule: error: {error}", file=sys.stderr)
        return 2
    weight = args.backward / 2 if args.weight is None else args.weight
    timeline = simulate(actions, args.forward / vpp, args.backward / vpp, weight / vpp)
    expected = theory(name, args.pp, vpp, args.microbatches, args.forward, args.backward, weight)
    print(render_text(timeline, args.pp, vpp))
    print(f"{name}: p={args.pp} v={vpp} m={args.microbatches}  step time {timeline.step_time:g} "
          f"(ideal {timeline.busy_time:g})  bubble {timeline.bubble_fraction:.4f}"
          + (f" (theory {expected:.4f})" if expected is not None else "")
          + f"  peak live chunk-forwards per rank {[peak_live_microbatches(a) for a in actions]}")
    if not args.no_png:
        out = args.out or f"schedule_{name}_pp{args.pp}_vpp{vpp}_m{args.microbatches}.png"
        save_png(timeline, args.pp, vpp, args.microbatches, out,
                 f"{name}: p={args.pp} v={vpp} m={args.microbatches}, bubble {timeline.bubble_fraction:.3f}")
        print(f"wrote {out}")
    return 0
