"""`plait schedule --pp 4 --vpp 2 --microbatches 8`: build, validate, simulate and draw a schedule.

Prints the timeline as text with the simulated step time and bubble next to the theory
((p-1)/m, or (p-1)/(v m) interleaved), and writes the PNG to `--out`.
"""

import argparse
import sys
from typing import List, Optional

from plait.parallel.pipeline.plot import render_text, save_png
from plait.parallel.pipeline.schedule import ScheduleError, build_schedule, schedule_name
from plait.parallel.pipeline.simulate import peak_live_microbatches, simulate, validate


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="plait schedule", description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, required=True, help="pipeline ranks p")
    parser.add_argument("--vpp", type=int, default=1, help="chunks per rank v (interleaved when > 1)")
    parser.add_argument("--microbatches", "-m", type=int, required=True, help="micro-batches m per step")
    parser.add_argument("--schedule", default="1f1b", help="gpipe | 1f1b (interleaved when --vpp > 1)")
    parser.add_argument("--forward", type=float, default=1.0, help="cost of one rank's forward (all its chunks)")
    parser.add_argument("--backward", type=float, default=2.0, help="cost of one rank's backward")
    parser.add_argument("--out", default=None, help="PNG path (default schedule_<name>_pp<p>_vpp<v>_m<m>.png)")
    parser.add_argument("--no-png", action="store_true", help="print the text timeline only")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    try:
        name = schedule_name(args.schedule, args.vpp)
        actions = build_schedule(name, args.pp, args.vpp, args.microbatches)
        validate(actions, args.pp, args.vpp, args.microbatches)
    except ScheduleError as error:
        print(f"plait schedule: error: {error}", file=sys.stderr)
        return 2
    timeline = simulate(actions, args.forward / args.vpp, args.backward / args.vpp)
    theory = (args.pp - 1) / (args.microbatches * (args.vpp if name == "interleaved" else 1))
    print(render_text(timeline, args.pp, args.vpp))
    print(f"{name}: p={args.pp} v={args.vpp} m={args.microbatches}  step time {timeline.step_time:g} "
          f"(ideal {timeline.busy_time:g})  bubble {timeline.bubble_fraction:.4f} (theory {theory:.4f})  "
          f"peak live chunk-forwards per rank {[peak_live_microbatches(a) for a in actions]}")
    if not args.no_png:
        out = args.out or f"schedule_{name}_pp{args.pp}_vpp{args.vpp}_m{args.microbatches}.png"
        save_png(timeline, args.pp, args.vpp, args.microbatches, out,
                 f"{name}: p={args.pp} v={args.vpp} m={args.microbatches}, bubble {timeline.bubble_fraction:.3f}")
        print(f"wrote {out}")
    return 0
