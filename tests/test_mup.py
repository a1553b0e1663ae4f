"""muP: the same init stds, learning rates and logit multiplier as the `mup` package (a mixture of experts'
routers as its MuReadout); the standard parametrization through the same path; the coordinate check passes under
muP and fails under the standard parametrization, with and without experts; tp=2, ZeRO-1 and ep=2 give one
process's losses."""

import math

import pytest
import torch

from plait.optim.builder import build_optimizer
from plait.optim.config import OptimConfig
from plait.optim.schedule import apply_lr
from plait.train.config import ModelConfig
from plait.parallel.plans import param_specs
from plait.train.build import default_init_std
from plait.train.model import Transformer
from plait.train.parametrization import build_parametrization

LR, WD = 1e-2, 0.1


def small(dim):
    return ModelConfig(dim=dim, n_layers=2, n_heads=4, vocab_size=256, max_seq_len=64, base_dim=32)


def plait_lrs_and_wds(model, cfg, mup):
    """{name: (lr, weight decay)} of each parameter's group once the schedule has set it."""
    optim_cfg = OptimConfig(name="adamw", lr=LR, weight_decay=WD, warmup_steps=0, schedule="constant", mup=mup)
    param = build_parametrization(cfg, optim_cfg)
    optimizer = build_optimizer(dict(model.named_parameters()), optim_cfg, param.group_of)
    apply_lr(optimizer, 5, 10, optim_cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}, param


def mup_readout(out_features: int) -> torch.nn.Module:
    """mup's MuReadout (`.head`) from width 128 to `out_features`, base width 32 (delta 64), as the package sets it
    up: what plait's readouts, the head and the MoE routers, are held to."""
    import mup

    class Readout(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.head = mup.MuReadout(dim, out_features, bias=False, output_mult=1.0)

    readout = Readout(128)
    mup.set_base_shapes(readout, Readout(32), delta=Readout(64))
    return readout


def test_mup_matches_the_mup_package():
    import mup

    cfg = small(128)  # width_mult 4 over base 32 (MLP fan-in 352 over 96)
    model, base, delta = Transformer(cfg), Transformer(small(32)), Transformer(small(64))
    mup.set_base_shapes(model, base, delta=delta)
    ref = mup.MuAdam(model.parameters(), lr=LR, weight_decay=WD, impl=torch.optim.AdamW)
    ref_of = {id(p): (g["lr"], g["weight_decay"]) for g in ref.param_groups for p in g["params"]}
    ours, param = plait_lrs_and_wds(model, cfg, mup=True)
    specs = param_specs(model)
    hidden = 0
    for name, p in model.named_parameters():
        ref_lr, ref_wd = ref_of[id(p)]
        assert ours[name][0] == pytest.approx(ref_lr, rel=1e-12), name
        if p.ndim >= 2:
            assert ours[name][1] == pytest.approx(ref_wd, rel=1e-12), name
        else:
            assert ours[name][1] == 0.0  # plait never decays norm gains or biases
        if p.ndim < 2:
            continue
        hidden += p.infshape.ninf() == 2
        torch.manual_seed(7)
        with torch.no_grad():
            mup.init.normal_(p, std=default_init_std(name, specs[name], cfg))
        torch.manual_seed(7)
        expected = torch.empty_like(p).normal_(0.0, param.std_of(name, specs[name]))
        assert torch.equal(p.data, expected), f"init std of {name} differs from mup's"
    assert hidden == 8 and ours["layers.0.mlp.w2.weight"][0] == pytest.approx(LR * 96 / 352)

    readout = mup_readout(256)
    x = torch.randn(3, 128)
    expected = readout.head(x)
    assert torch.allclose(torch.nn.functional.linear(x, readout.head.weight) * param.scales.logits, expected,
                          rtol=1e-6, atol=1e-7)
    assert param.scales.attention == pytest.approx(math.sqrt(8) / 32)  # attn_mult * sqrt(base d_head) / d_head


def test_moe_routers_and_shared_gates_are_readouts_as_mup_s():
    """A mixture of experts' router and shared-expert gate read the width out into a fixed number of experts: the
    same learning rate and forward multiplier (1/width_mult) as the mup package's MuReadout of that shape; the
    experts, their width growing with the model's, are hidden matrices."""
    import dataclasses

    import mup

    cfg = dataclasses.replace(small(128), moe_experts=4, moe_shared_ffn_dim=64)
    param = build_parametrization(cfg, OptimConfig(name="adamw", lr=LR, mup=True))
    model = Transformer(cfg, scales=param.scales)
    ours, _ = plait_lrs_and_wds(model, cfg, mup=True)
    for name in ("layers.1.mlp.router.weight", "layers.1.mlp.shared_gate.weight"):
        entry = param.table[name]
        assert (entry.role, entry.width_mult, entry.init_mult, entry.lr_mult) == ("output", 4.0, 1.0, 1.0), name
    for name in ("layers.1.mlp.experts.3.w13.weight", "layers.1.mlp.experts.3.w2.weight",
                 "layers.1.mlp.shared.w2.weight"):
        assert param.table[name].role == "hidden", name
    assert param.scales.router == 0.25

    reference = mup_readout(4)
    lr_of = {id(p): g["lr"] for g in mup.MuAdam(reference.parameters(), lr=LR).param_groups for p in g["params"]}
    router = model.layers["1"].mlp.router
    with torch.no_grad():
        router.weight.copy_(reference.head.weight)
    x = torch.randn(5, 128)
    assert torch.allclose(router(x), reference.head(x), rtol=1e-6, atol=1e-7)
    assert ours["layers.1.mlp.router.weight"][0] == pytest.approx(lr_of[id(reference.head.weight)], rel=1e-12)


def test_standard_parametrization_is_the_same_path_with_unit_multipliers():
    cfg = small(128)
    model = Transformer(cfg)
    ours, param = plait_lrs_and_wds(model, cfg, mup=False)
    for name, p in model.named_parameters():
        assert ours[name] == (LR, WD if p.ndim >= 2 else 0.0), name
        entry = param.table[name]
        assert (entry.init_mult, entry.lr_mult) == (1.0, 1.0)
    assert (param.scales.embedding, param.scales.logits, param.scales.attention) == (1.0, 1.0, None)
    assert {e.role for e in param.table.values()} == {"input", "hidden", "output", "vector"}


def test_coordinate_check(stdlib_tokens):
    """mup's criterion: under muP every hidden layer at width 4w within 1.2x of width w at steps 1-3."""
    from plait.train.coord_check import coord_data, growth, worst_hidden

    settings = dict(steps=3, seeds=3, optim="lion", lr=2e-3, base_dim=64)
    mup_coords = coord_data([64, 256], True, str(stdlib_tokens[0]), **settings)
    sp_coords = coord_data([64, 256], False, str(stdlib_tokens[0]), **settings)
    assert worst_hidden(mup_coords) <= 1.2, growth(mup_coords)
    assert growth(mup_coords)["logits"][1] <= 1.2  # the logits may shrink at init, never grow
    assert worst_hidden(sp_coords) > 2.0, growth(sp_coords)


def test_coordinate_check_with_mixtures_of_experts(stdlib_tokens):
    """Each MLP a mixture of 4 experts: under muP the mixtures' outputs, like every hidden layer, stay within 1.2x
    at 4x the width, and the routers' logits never grow (they shrink at init, as the logits do); under the
    standard parametrization the routers' logits grow more than 2x once updated."""
    from plait.train.coord_check import coord_data, growth, readout_growth, worst_hidden

    settings = dict(steps=3, seeds=3, optim="lion", lr=2e-3, base_dim=128, experts=4)  # (from width 128: at 64
    mup_coords = coord_data([128, 512], True, str(stdlib_tokens[0]), **settings)  # the mixtures' 1e-3 is noise)
    sp_coords = coord_data([128, 512], False, str(stdlib_tokens[0]), **settings)
    assert {"0.router", "1.router", "0.moe", "1.moe"} <= set(growth(mup_coords))
    assert worst_hidden(mup_coords) <= 1.2, growth(mup_coords)
    assert readout_growth(mup_coords) <= 1.2, growth(mup_coords)
    assert min(growth(sp_coords)[f"{index}.router"][1] for index in (0, 1)) > 2.0, growth(sp_coords)


STEPS = 4


def parallel_overrides(run_dir, cache, tp=1, dp=1, zero=0, ep=1, extra=()):
    return ["model.dim=64", "model.base_dim=32", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=96",
            "optim=lion", "optim.mup=true", "optim.impl=foreach", "optim.lr=4e-3", "optim.warmup_steps=0",
            "train.seq_len=32", "train.batch_size=4", f"train.steps={STEPS}", "train.eval_every=0",
            "train.log_every=1", "train.progress=false", "train.peak_flops=1e10", "checkpoint.every=0",
            f"train.run_dir={run_dir}", f"data.cache_dir={cache}",
            f"parallel.tp={tp}", f"parallel.dp={dp}", f"parallel.zero={zero}", f"parallel.ep={ep}", *extra]


def losses_of(trainer):
    try:
        return [trainer.step()["loss"] for _ in range(STEPS)]
    finally:
        trainer.close()


MOE = ("model.moe_experts=4", "model.moe_shared_ffn_dim=48", "model.moe_aux_loss_type=global_aux_loss")
LAYOUTS = {"tp2": (dict(tp=2), ()), "dp2-zero1": (dict(dp=2, zero=1), ()),  # label: (layout, model settings)
           "moe-tp2": (dict(tp=2), MOE), "moe-ep2": (dict(dp=2, ep=2), MOE)}


def mup_parallel_worker(rank, world, tmp, cache):
    from plait.launch.env import ProcessEnv
    from plait.train import Trainer, load_config

    out = {}
    for label, (layout, extra) in LAYOUTS.items():
        cfg = load_config(parallel_overrides(f"{tmp}/{label}", cache, extra=extra, **layout))
        trainer = Trainer(cfg, env=ProcessEnv(rank, 0, world, "torchrun"))
        scales = trainer.parametrization.scales  # width_mult 2 from global shapes on every rank
        assert (scales.logits, scales.router) == (0.5, 0.5 if extra else 1.0)
        out[label] = losses_of(trainer)
    return out


def test_mup_lion_under_tp2_zero1_and_ep2_matches_one_process(tmp_path, stdlib_tokens):
    """The multipliers and learning rates come from global shapes: tp2 and ZeRO-1, and with mixtures of experts
    tp2 (the routers replicated, their grads partial) and ep2 (each rank two of the four experts), give one
    process's losses."""
    from plait.train import Trainer, load_config
    from tests.dist_utils import run_ranks

    cache = stdlib_tokens[0].parent.parent
    reference = {extra: losses_of(Trainer(load_config(parallel_overrides(tmp_path / f"one{len(extra)}", cache,
                                                                          extra=extra))))
                 for extra in ((), MOE)}
    for losses in reference.values():
        assert losses[-1] < losses[0] - 0.05  # it trains
    results = run_ranks(2, mup_parallel_worker, str(tmp_path), str(cache))
    for label, (_, extra) in LAYOUTS.items():
        for rank in range(2):
            assert results[rank][label] == pytest.approx(reference[extra], rel=1e-5, abs=1e-5), (label, rank)


def test_transfer_summary_measures_shift_and_cost():
    """The benchmark's verdict on synthetic curves: a drifting optimum and its cost in nats."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "mup_transfer.py"
    spec = importlib.util.spec_from_file_location("mup_transfer", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = []
    for width, best in ((64, -8), (128, -9), (256, -10)):  # the optimum falls one step per doubling
        for exp in range(-12, -6):
            for seed in range(2):
                rows.append({"param": "standard", "width": width, "lr": 2.0 ** exp, "seed": seed,
                             "loss": 3.0 + 0.1 * (exp - best) ** 2 + 0.01 * seed})
    summary = bench.summarize(rows, [64, 128, 256])["standard"]
    assert summary["shift_steps"] == 2.0
    assert summary["cost_at_largest"] == pytest.approx(0.4)  # 0.1 * (2 steps)^2


def test_zero_readout_and_zero_query_options():
    from plait.train.parametrization import init_model

    cfg = small(64)
    optim_cfg = OptimConfig(name="lion", mup=True, mup_zero_readout=True, mup_zero_query=True)
    model = Transformer(cfg)
    init_model(model, 0, build_parametrization(cfg, optim_cfg))
    wqkv = model.layers["0"].attn.wqkv.weight
    assert torch.count_nonzero(model.head.weight) == 0
    assert torch.count_nonzero(wqkv[:64]) == 0 and torch.count_nonzero(wqkv[64:]) == wqkv[64:].numel()
    default = Transformer(cfg)
    init_model(default, 0, build_parametrization(cfg, OptimConfig(name="lion", mup=True)))
    assert torch.count_nonzero(default.head.weight) == default.head.weight[:cfg.vocab_size].numel()
