"""One-sentence checks of settings: a value in its range, a name among the keys of a table.

Each part validates its own config group with these and its own error class, so the
sentence always names the setting (`optim.lr=-1 must be > 0.`) and, for a choice, lists
the options from the very table that builds them (`optim.schedule=cosin is not one of
cosine, linear, constant.`).
"""

from typing import Any, Iterable, Optional, Type


class SettingError(ValueError):
    """A setting that cannot work, explained in one sentence naming it and the fix.

    Every part's own error for its settings derives from it (LayoutError, OptimError,
    OffloadError, DataError, LaunchError), so `except SettingError` (`plait.train.ConfigError`)
    catches a bad config whichever part judged it.
    """


def number(error: Type[Exception], key: str, value: Any, *, low: Optional[float] = None, high: Optional[float] = None,
           low_open: bool = False, high_open: bool = False, integer: bool = False, fix: str = "") -> None:
    """`value` is a number (an integer if asked) in [low, high] (open ends where asked), else `error`."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or value != value:  # NaN fails every comparison
        raise error(f"{key}={value} must be {kind}{'; ' + fix if fix else '.'}")
    bounds = []
    if low is not None and (value <= low if low_open else value < low):
        bounds.append(f"> {low:g}" if low_open else f">= {low:g}")
    if high is not None and (value >= high if high_open else value > high):
        bounds.append(f"< {high:g}" if high_open else f"<= {high:g}")
    if bounds:
        allowed = []
        if low is not None:
            allowed.append(f"> {low:g}" if low_open else f">= {low:g}")
        if high is not None:
            allowed.append(f"< {high:g}" if high_open else f"<= {high:g}")
        raise error(f"{key}={value} must be {' and '.join(allowed)}{'; ' + fix if fix else '.'}")


def choice(error: Type[Exception], key: str, value: Any, options: Iterable[str]) -> None:
    """`value` is one of `options` (a table's keys), else `error` listing them."""
    options = list(options)
    if value not in options:
        raise error(f"{key}={value} is not one of {', '.join(map(str, options))}.")
