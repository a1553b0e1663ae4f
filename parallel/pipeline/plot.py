"""Draw a simulated timeline: as text (one line per rank) and as a PNG (the paper's figure).

Each box is one compute: its micro-batch gives the color (forward lighter, backward full,
a weight-grad half W hatched), its label is the micro-batch number plus, with v > 1, the
chunk letter (a = the rank's first chunk): lowercase for a forward, uppercase for a
backward (whole, or its input half I), and a trailing "w" for W.
"""

import os
import tempfile
from pathlib import Path
from typing import List

from plait.parallel.pipeline.schedule import Action, Kind
from plait.parallel.pipeline.simulate import Timeline


def _label(action: Action, pp: int, vpp: int) -> str:
    chunk = "abcdefghijklmnopqrstuvwxyz"[action.stage // pp] if vpp > 1 else ""
    if action.kind == Kind.F:
        return f"{action.microbatch}{chunk}"
    return f"{action.microbatch}{chunk.upper()}{'w' if action.kind == Kind.W else ''}"


def render_text(timeline: Timeline, pp: int, vpp: int) -> str:
    """One line per rank; each cell is one time unit (the cheapest compute), '.' when idle."""
    durations = [end - start for rank in timeline.intervals for _, start, end in rank]
    unit = min(durations) if durations else 1.0
    slots = int(round(timeline.step_time / unit))
    width = max(3, max((len(_label(a, pp, vpp)) + 1 for rank in timeline.intervals for a, _, _ in rank), default=3))
    lines = []
    for rank, intervals in enumerate(timeline.intervals):
        cells: List[str] = ["." .rjust(width)] * slots
        for action, start, end in intervals:
            text = _label(action, pp, vpp)
            if action.kind in (Kind.B, Kind.I):
                text = text if vpp > 1 else f"{text}'"
            for slot in range(int(round(start / unit)), int(round(end / unit))):
                cells[slot] = text.rjust(width)
        lines.append(f"rank {rank} |" + "".join(cells) + "|")
    legend = ("cells: micro-batch, then chunk (lowercase forward, uppercase backward or its input half, "
              "w: weight half)" if vpp > 1
              else "cells: micro-batch (forward), micro-batch' (backward or its input half), micro-batch w (weight half)")
    return "\n".join(lines + [legend])


def save_png(timeline: Timeline, pp: int, vpp: int, microbatches: int, path: str, title: str = "") -> None:
    """The timeline as a PNG: one row per rank, boxes colored by micro-batch; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    colors = plt.get_cmap("tab20" if microbatches > 10 else "tab10")
    figure, axes = plt.subplots(figsize=(max(8.0, timeline.step_time * 0.25 + 2), 0.55 * pp + 1.2))
    for rank, intervals in enumerate(timeline.intervals):
        y = pp - 1 - rank
        for action, start, end in intervals:
            color = colors(action.microbatch % colors.N)
            forward = action.kind == Kind.F
            axes.add_patch(Rectangle((start, y + 0.1), end - start, 0.8, facecolor=color,
                                     alpha=0.45 if forward else 1.0, edgecolor="black", linewidth=0.5,
                                     hatch="///" if action.kind == Kind.W else None))
            axes.text((start + end) / 2, y + 0.5, _label(action, pp, vpp), ha="center", va="center", fontsize=7)
    axes.set_xlim(0, timeline.step_time)
    axes.set_ylim(0, pp)
    axes.set_yticks([pp - 1 - r + 0.5 for r in range(pp)], [f"rank {r}" for r in range(pp)])
    axes.set_xlabel("time (units of --forward: one rank's forward over all its chunks)")
    axes.set_title(title or f"p={pp} v={vpp} m={microbatches}: bubble {timeline.bubble_fraction:.3f}")
    figure.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".png", dir=target.parent)
    os.close(handle)
    try:
        figure.savefig(temporary, dpi=120)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; a figure is for sharing
        os.replace(temporary, target)
    finally:
        plt.close(figure)
        if os.path.exists(temporary):
            os.remove(temporary)
