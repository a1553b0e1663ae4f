"""`plait plan`: its figures against real tensors on small configs, and a 70B plan on 1,024 ranks."""

import subprocess
import sys

import pytest
import torch

from plait.train.plan import (block_activation_elements, head_activation_elements, moe_extra_bytes, plan,
                              stand_in_grid)
from plait.optim.builder import build_optimizer
from plait.train.parametrization import build_parametrization
from plait.parallel.layout import Layout
from plait.train.config import ffn_dim, kv_heads, load_config
from plait.parallel.plans import padded_vocab, parallelize
from plait.train.build import LLAMA_PLAN, build_model
from plait.train.model import Transformer
from tests.memory_utils import saved_activation_bytes

SMALL = ["model=tiny", "train.seq_len=64", "train.batch_size=8"]


@pytest.mark.parametrize("optim", ["adamw", "lion", "muon"])
def test_weights_grads_optimizer_match_real_tensors(optim):
    cfg = load_config(SMALL + [f"optim={optim}", "optim.impl=foreach", "parallel.tp=2", "launch.world_size=4"])
    result = plan(cfg, 4)
    stage = result.stages[0]
    # the real rank-1 shard (tp rank 1 of 2), built on the CPU with the same stand-in grid
    model = build_model(cfg.model, stand_in_grid(Layout(4, 2, 1, 2), 1), device="cpu")
    params = dict(model.named_parameters())
    for p in params.values():
        p.grad = torch.zeros_like(p)
    optimizer = build_optimizer(params, cfg.optim, build_parametrization(cfg.model, cfg.optim).group_of)
    optimizer.step()
    weights = sum(p.numel() * p.element_size() for p in params.values())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params.values())
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    assert stage.params == sum(p.numel() for p in params.values())
    assert stage.weights == pytest.approx(weights, rel=0.10)
    assert stage.grads == pytest.approx(grads, rel=0.10)
    assert stage.optimizer == state  # exactly: fp32 state per parameter, by optimizer (Muon: matrices and the rest)
    assert stage.held(1) == (stage.weights, stage.grads, pytest.approx(state / 2, rel=0.10))  # dp = 2


def test_activations_match_a_real_forward():
    """The plan's activations for one micro-batch against what a real CPU forward saves."""
    cfg = load_config(SMALL)
    b, s = 4, 64
    model = Transformer(cfg.model)
    ids = torch.randint(0, cfg.model.vocab_size, (b, s + 1))
    measured = saved_activation_bytes(model, lambda: model.loss(model(ids[:, :-1]), ids[:, 1:]))
    planned = 4 * (cfg.model.n_layers * block_activation_elements(cfg.model, b * s, 1, False)
                   + head_activation_elements(cfg.model, b * s, 1, False, model.vocab))
    assert planned == pytest.approx(measured, rel=0.10)
    # the tp=2 shard of a block (no head): the stand-in grid's mappings are the identity, shapes are real
    block = parallelize(Transformer(cfg.model, layers=[0], has_embedding=False, has_head=False, device="cpu"),
                        stand_in_grid(Layout(2, 2, 1, 1), 0), LLAMA_PLAN)
    x = torch.randn(b, s, cfg.model.dim, requires_grad=True)
    measured_tp2 = saved_activation_bytes(block, lambda: block(x))
    assert 4 * block_activation_elements(cfg.model, b * s, 2, False) == pytest.approx(measured_tp2, rel=0.10)
    # with QK-norm, each head's q and k norms keep theirs: exactly the plan's extra elements more than without
    blocks = {qk: Transformer(load_config(SMALL + [f"model.qk_norm={qk}"]).model, layers=[0], has_embedding=False,
                              has_head=False, device="cpu") for qk in (False, True)}
    kept = {qk: saved_activation_bytes(one, lambda: one(x)) for qk, one in blocks.items()}
    extra = {qk: 4 * block_activation_elements(one.cfg, b * s, 1, False) for qk, one in blocks.items()}
    assert kept[True] - kept[False] == extra[True] - extra[False] > 0
    # a mixture of experts keeps each choice's row, expert activations, output, weight and indices: exactly the
    # plan's bytes more than the dense MLP, at tp 1 and (the stand-in grid's shard shapes) tp 2
    # (without renormalizing the top k; with the router z-loss; with a shared expert; with a routing bias; the
    # balancing loss per sequence (one fp32 number per expert and sequence) or with every rank's loads; DeepSeek-V3's
    # sigmoid scores, whose sum per token the balancing loss keeps, and scaled weights; group-limited routing, which
    # keeps nothing more, and an ungated shared expert, which keeps less)
    for experts, top_k, tp, options in ((4, 1, 1, []), (8, 2, 1, []), (4, 2, 2, []),
                                        (4, 2, 1, ["model.moe_norm_topk=false", "model.moe_z_loss=0.1"]),
                                        (4, 2, 2, ["model.moe_shared_ffn_dim=64", "model.moe_z_loss=0.1"]),
                                        (4, 2, 1, ["model.moe_bias_update_rate=0.01"]),
                                        (4, 2, 1, ["model.moe_aux_loss_type=seq_aux_loss"]),
                                        (4, 2, 1, ["model.moe_aux_loss_type=global_aux_loss"]),
                                        (4, 2, 2, ["model.moe_score_function=sigmoid",
                                                   "model.moe_topk_scaling_factor=2.5"]),
                                        (8, 4, 2, ["model.moe_router_groups=4", "model.moe_router_group_topk=2",
                                                   "model.moe_shared_ffn_dim=64", "model.moe_shared_gate=false"])):
        moe_cfg = load_config(SMALL + [f"model.moe_experts={experts}", f"model.moe_top_k={top_k}", *options]).model
        pair = [parallelize(Transformer(one, layers=[0], has_embedding=False, has_head=False, device="cpu"),
                            stand_in_grid(Layout(tp, tp, 1, 1), 0), LLAMA_PLAN) for one in (cfg.model, moe_cfg)]
        dense_kept, moe_kept = (saved_activation_bytes(one, lambda: one(x)) for one in pair)
        assert moe_kept - dense_kept == moe_extra_bytes(moe_cfg, b * s, tp, 4, b) > 0
    # under a capacity the plan is exact when nothing is dropped (factor E) and an upper bound when pairs are
    for factor, exact in ((4.0, True), (0.5, False)):
        moe_cfg = load_config(SMALL + ["model.moe_experts=4", f"model.moe_capacity_factor={factor}"]).model
        pair = [Transformer(one, layers=[0], has_embedding=False, has_head=False, device="cpu")
                for one in (cfg.model, moe_cfg)]
        dense_kept, moe_kept = (saved_activation_bytes(one, lambda: one(x)) for one in pair)
        planned = moe_extra_bytes(moe_cfg, b * s, 1, 4)
        assert (moe_kept - dense_kept == planned) if exact else (moe_kept - dense_kept < planned), \
            (factor, moe_kept - dense_kept, planned)
    # with the head and loss in 4 slices: the logits are not kept (the plan counts one slice's, recomputed)
    model.loss_chunks = 4
    sliced = saved_activation_bytes(model, lambda: model.loss(model(ids[:, :-1]), ids[:, 1:]))
    planned_sliced = 4 * (cfg.model.n_layers * block_activation_elements(cfg.model, b * s, 1, False)
                          + head_activation_elements(cfg.model, b * s, 1, False, model.vocab, 4))
    assert planned_sliced == pytest.approx(sliced, rel=0.10) and sliced < measured - 4 * b * s * model.vocab * 0.7
    # and the trainer's memory for a whole step is the plan's: one micro-batch alive at a time (pp=1)
    result = plan(load_config(SMALL + ["parallel.microbatches=2"]), 1)
    assert result.stages[0].activations == pytest.approx(measured, rel=0.10)


def llama_params(model_cfg, vocab: int) -> int:
    """Parameter count from the architecture (untied embedding and head, no biases)."""
    d, f = model_cfg.dim, ffn_dim(model_cfg)
    head_dim = d // model_cfg.n_heads
    q, kv = model_cfg.n_heads * head_dim, kv_heads(model_cfg) * head_dim
    block = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
    return 2 * vocab * d + model_cfg.n_layers * block + d


def test_70b_on_1024_ranks_and_bubble():
    cfg = load_config(["model=70b", "parallel.tp=8", "parallel.pp=8", "parallel.microbatches=32",
                       "train.batch_size=512", "train.seq_len=4096", "train.precision=bf16", "launch.world_size=1024"])
    result = plan(cfg, 1024)
    assert (result.layout.tp, result.layout.dp, result.layout.pp) == (8, 16, 8)
    assert result.total_params == llama_params(cfg.model, padded_vocab(32000, 8))  # 68.98B
    assert sum(s.layers for s in result.stages) == 80
    assert result.bubble == pytest.approx(7 / 32)  # 1F1B: (p - 1) / m
    assert [s.inflight for s in result.stages] == [8 - r for r in range(8)]  # 1F1B keeps p - r alive
    first = result.stages[0]
    assert first.dp_bytes == pytest.approx(2 * 15 / 16 * first.params * 4)


def test_plan_cli_and_bad_world_size():
    big = subprocess.run([sys.executable, "-m", "plait.train.tools", "plan", "model=70b", "parallel.tp=8",
                          "parallel.pp=8", "parallel.vpp=2", "parallel.microbatches=32", "train.batch_size=512",
                          "launch.world_size=1024"], capture_output=True, text=True, timeout=120)
    assert big.returncode == 0, big.stderr
    assert "world 1024 = tp 8 x dp 16 x pp 8" in big.stdout and "interleaved" in big.stdout
    bad = subprocess.run([sys.executable, "-m", "plait.train.tools", "plan", "parallel.tp=2", "launch.world_size=3"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "parallel.tp" in bad.stderr and "world size 3" in bad.stderr


def test_tied_embeddings_under_a_pipeline_hold_a_copy_counted_once():
    """The last stage holds the tied head's copy (its weights count it), the model's total does not."""
    base = ["model=tiny", "model.tie_embeddings=true", "train.seq_len=64", "train.batch_size=8",
            "parallel.microbatches=4"]
    one = plan(load_config(base + ["launch.world_size=1"]), 1)
    piped = plan(load_config(base + ["parallel.pp=2", "launch.world_size=2"]), 2)
    untied = plan(load_config(base + ["model.tie_embeddings=false", "parallel.pp=2", "launch.world_size=2"]), 2)
    assert piped.total_params == one.total_params < untied.total_params
    assert [s.params for s in piped.stages] == [s.params for s in untied.stages]  # the copy is held


def test_expert_parallel_ranks_hold_their_share_of_the_experts():
    """Under parallel.ep=2 a rank holds half the experts of each layer: exactly that many parameters fewer than
    at ep=1 (and half the optimizer state of them), while the model's total stays the same."""
    base = ["model=tiny", "model.moe_experts=4", "train.seq_len=64", "train.batch_size=8", "launch.world_size=2"]
    whole, split = (plan(load_config(base + [f"parallel.ep={ep}"]), 2) for ep in (1, 2))
    cfg = load_config(base).model
    expert = 3 * cfg.dim * ffn_dim(cfg)
    assert whole.total_params == split.total_params
    assert whole.stages[0].params - split.stages[0].params == cfg.n_layers * 2 * expert
    assert whole.stages[0].optimizer - split.stages[0].optimizer == 8 * cfg.n_layers * 2 * expert  # AdamW: 2 x fp32


# tp traffic --------------------------------------------------------------------------------------
TP2 = ["model=tiny", "train.seq_len=64", "train.batch_size=8", "train.progress=false", "train.peak_flops=1e10",
       "train.eval_every=0", "checkpoint.save_final=false", "parallel.tp=2"]


def _tp_bytes_sent(rank, world, extra, run_dir, cache):
    """Bytes this rank sends over tp in one training step, counted at the collectives on the tp group (a ring over
    two ranks: an all-reduce sends the whole tensor, an all-gather or reduce-scatter half the whole)."""
    import torch.distributed as dist

    from plait.common import collectives
    from tests.train_utils import make_trainer

    trainer = make_trainer(rank, world, TP2, extra, run_dir, cache)
    tp, sent = trainer.grid.tp_group, [0]
    real = dist.all_reduce, collectives.all_gather_tensor, collectives.reduce_scatter_tensor

    def counting(collective, whole_of):
        def counted(*args, group=None, **kwargs):
            if group is tp:
                whole = whole_of(*args)
                sent[0] += whole.numel() * whole.element_size() // (1 if collective is real[0] else 2)
            return collective(*args, group=group, **kwargs)
        return counted

    dist.all_reduce = counting(real[0], lambda tensor, *_: tensor)
    collectives.all_gather_tensor = counting(real[1], lambda out, *_: out)
    collectives.reduce_scatter_tensor = counting(real[2], lambda out, whole, *_: whole)
    try:
        trainer.step()
    finally:
        dist.all_reduce, collectives.all_gather_tensor, collectives.reduce_scatter_tensor = real
        trainer.close()
    return sent[0]


@pytest.mark.parametrize("extra", [
    [], ["parallel.sequence_parallel=true"], ["model.attention=mla"],
    ["model.attention=mla", "model.q_lora_rank=96", "parallel.sequence_parallel=true"],
    ["model.attention=mla", "parallel.sequence_parallel=true", "parallel.tp_overlap=false"],
], ids=["tp2", "tp2-sp", "mla-tp2", "mla-query-latent-tp2-sp", "mla-tp2-sp-mapped"])
def test_the_plan_counts_what_the_tp_collectives_send(extra, tmp_path, stdlib_tokens):
    """`plait plan`'s tp bytes are what one step sends over tp: the blocks' mappings (latent attention's narrower
    inputs and shared rotary key), the embedding's, the cross-entropy's, the once-a-step sum of the partial grads
    of replicated weights (norms and MLA's down projections under SP), and under SP with `parallel.tp_overlap`
    (auto: on at tp 2) each column-parallel input gathered again in backward; without it, not."""
    from tests.dist_utils import run_ranks

    sent = run_ranks(2, _tp_bytes_sent, extra, tmp_path / "run", stdlib_tokens[0].parent.parent)
    planned = plan(load_config(TP2 + extra + ["launch.world_size=2"]), 2).stages[0].tp_bytes
    assert sent == [planned, planned] and planned > 0


CP2 = [item.replace("parallel.tp=2", "parallel.cp=2") for item in TP2]


def _cp_bytes_sent(rank, world, extra, run_dir, cache):
    """Bytes this rank sends to the other cp rank in one training step: the ring's sends, or Ulysses' all-to-all
    pieces for the other rank."""
    import torch.distributed as dist

    from tests.train_utils import make_trainer

    trainer = make_trainer(rank, world, CP2, extra, run_dir, cache)
    sent, real = [0], (dist.batch_isend_irecv, dist.all_to_all)

    def exchange(ops):
        sent[0] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        return real[0](ops)

    def all_to_all(received, pieces, group=None, **kwargs):
        mine = dist.get_rank(group)
        sent[0] += sum(p.numel() * p.element_size() for index, p in enumerate(pieces) if index != mine)
        return real[1](received, pieces, group=group, **kwargs)

    dist.batch_isend_irecv, dist.all_to_all = exchange, all_to_all
    try:
        trainer.step()
    finally:
        dist.batch_isend_irecv, dist.all_to_all = real
        trainer.close()
    return sent[0]


@pytest.mark.parametrize("extra", [[], ["parallel.cp_mode=ulysses"], ["model.attention=mla"],
                                   ["model.attention=mla", "parallel.cp_mode=ulysses"]],
                         ids=["ring", "ulysses", "mla-ring", "mla-ulysses"])
def test_the_plan_counts_what_context_parallelism_sends(extra, tmp_path, stdlib_tokens):
    """`plait plan`'s cp bytes are what one step sends between the cp ranks: K and V round the ring and their
    fp32 grads back, or Ulysses' q, k, v and output each way (latent attention's every head's key and padded
    values)."""
    from tests.dist_utils import run_ranks

    sent = run_ranks(2, _cp_bytes_sent, extra, tmp_path / "run", stdlib_tokens[0].parent.parent)
    planned = plan(load_config(CP2 + extra + ["launch.world_size=2"]), 2).stages[0].cp_bytes
    assert sent == [planned, planned] and planned > 0
