"""Learning-rate schedules: warm-up, then cosine, linear, constant or warmup-stable-decay, against their
closed forms step by step."""

import math

import pytest

from plait.optim.config import OptimConfig
from plait.optim.schedule import lr_factor


def factors(total, **settings):
    cfg = OptimConfig(**settings)
    return [lr_factor(step, total, cfg) for step in range(total)]


def test_warmup_then_cosine_and_linear_decay_to_the_floor():
    for schedule, shape in (("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))), ("linear", lambda p: 1 - p)):
        got = factors(50, schedule=schedule, warmup_steps=10, min_lr_ratio=0.1)
        assert got[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
        assert got[10:] == pytest.approx([0.1 + 0.9 * shape((s - 10) / 40) for s in range(10, 50)])
    assert factors(20, schedule="constant", warmup_steps=4)[4:] == [1.0] * 16


@pytest.mark.parametrize("shape", ["sqrt", "linear", "cosine"])
def test_wsd_holds_the_peak_and_decays_only_the_last_fraction(shape):
    decay = {"sqrt": lambda p: 1 - math.sqrt(p), "linear": lambda p: 1 - p,
             "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p))}[shape]
    settings = dict(schedule="wsd", warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2, decay_shape=shape)
    got = factors(100, **settings)
    assert got[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert got[10:80] == [1.0] * 70  # stable: exactly the peak
    assert got[80:] == pytest.approx([0.1 + 0.9 * decay((s - 80) / 20) for s in range(80, 100)])
    # a longer run has the same schedule up to the shorter one's decay: extend a run from a checkpoint before it
    assert factors(200, **settings)[:80] == got[:80]
    # a decay longer than what warm-up leaves starts right after warm-up
    short = factors(12, **{**settings, "decay_fraction": 0.5})
    assert short[:10] == pytest.approx([(s + 1) / 10 for s in range(10)]) and short[10] == 1.0 and short[11] < 1.0


def test_schedule_settings_are_checked():
    from plait.train.config import ConfigError, load_config, validate

    validate(load_config(["optim.schedule=wsd", "optim.decay_shape=cosine", "optim.decay_fraction=1"]))
    for override, message in (("optim.decay_fraction=0", "optim.decay_fraction=0"),
                              ("optim.decay_shape=exp", "optim.decay_shape=exp is not one of cosine, linear, sqrt")):
        with pytest.raises(ConfigError, match=message):
            validate(load_config([override]))
