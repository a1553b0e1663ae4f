"""A mixture of experts (`model.moe_*`): top-k routed SwiGLU experts, dropless or under a capacity, with the
Switch load-balancing loss, the router z-loss, DeepSeek-V3's routing bias, Qwen's unnormalized top-k and shared
expert.

Held to: a token-by-token loop (outputs and every grad; under a capacity, a loop over each expert's kept pairs);
the auxiliary gradients joining backward at the main loss's scale (the same grads as adding the losses to the
loss, at any micro-batch count and fp16 scale); the routing bias's update rule; an expert no token chose still
getting a (zero) grad; transformers' `MixtralForCausalLM`, `Qwen2MoeForCausalLM` and `Qwen3MoeForCausalLM` on the
exported weights; every layout against one process (tp's single gather and reduction around the experts, the
router's and the shared gate's grads summed over tp, SP, pipelines and a split backward, dp with ZeRO, cp, and
expert parallelism: `parallel.ep` ranks each holding their share of the experts, tokens exchanged by
all-to-all); expert-parallel checkpoints, routing biases included, resuming exactly in one process and back;
offload and recompute.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_ranks
from train_utils import train_steps
from plait.train.build import build_model
from plait.train.config import ModelConfig
from plait.train.model import Scales
from plait.train.moe import MoE, load_balancing_loss

SMALL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=48, max_seq_len=64)


def moe_of(top_k: int = 2, experts: int = 4, aux: float = 0.01, seed: int = 3, **options) -> MoE:
    cfg = ModelConfig(**SMALL, moe_experts=experts, moe_top_k=top_k, moe_aux_loss=aux, **options)
    return build_model(cfg, seed=seed).layers["0"].mlp


def token_by_token(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Each token on its own: softmax over the experts (or each expert's sigmoid), the top k (renormalized under
    norm_topk, times the scaling factor), their outputs weighted and summed; plus the shared expert's output times
    the sigmoid of its gate, where there is one."""
    rows = []
    for token in x.reshape(-1, x.shape[-1]):
        logits = token @ moe.router.weight.T
        probs = torch.sigmoid(logits) if moe.sigmoid else F.softmax(logits, dim=-1)
        top, chosen = probs.topk(moe.top_k)
        choice = probs + moe.expert_bias if moe.expert_bias is not None else probs.clone()
        if moe.groups > 1:  # only the experts of the best groups, a group scored by the sum of its best experts
            groups = choice.view(moe.groups, -1)
            best = groups.topk(moe.top_k // moe.group_topk, dim=-1).values.sum(-1).topk(moe.group_topk).indices
            for group in set(range(moe.groups)) - set(best.tolist()):
                groups[group] = float("-inf")
        if moe.expert_bias is not None or moe.groups > 1:  # they pick the experts, the probabilities weigh them
            chosen = choice.topk(moe.top_k).indices
            top = probs[chosen]
        top = (top / top.sum() if moe.norm_topk else top) * moe.topk_scale
        row = sum(w * moe.experts[str(int(e))](token[None])[0] for w, e in zip(top, chosen))
        if moe.shared is not None:
            gate = torch.sigmoid(token @ moe.shared_gate.weight[0]) if moe.shared_gate is not None else 1.0
            row = row + gate * moe.shared(token[None])[0]
        rows.append(row)
    return torch.stack(rows).view_as(x)


VARIANTS = {"top1": (1, {}), "top2": (2, {}), "top3": (3, {}),
            "top2-unnormalized-shared": (2, {"moe_norm_topk": False, "moe_shared_ffn_dim": 40}),
            "top1-unnormalized": (1, {"moe_norm_topk": False}),
            "top2-sigmoid-scaled": (2, {"moe_score_function": "sigmoid", "moe_topk_scaling_factor": 2.5}),
            "top1-sigmoid-unnormalized-biased": (1, {"moe_score_function": "sigmoid", "moe_norm_topk": False,
                                                     "moe_bias_update_rate": 0.01}),
            "top4-of-8-in-2-of-4-groups": (4, {"experts": 8, "moe_router_groups": 4, "moe_router_group_topk": 2}),
            "top2-sigmoid-1-of-2-groups-biased-ungated-shared": (2, {
                "moe_score_function": "sigmoid", "moe_router_groups": 2, "moe_router_group_topk": 1,
                "moe_bias_update_rate": 0.01, "moe_shared_ffn_dim": 40, "moe_shared_gate": False}),
            "top2-biased": (2, {"moe_bias_update_rate": 0.01}),
            "top1-biased-unnormalized": (1, {"moe_bias_update_rate": 0.01, "moe_norm_topk": False})}
BIAS = torch.tensor([0.02, -0.03, 0.0, 0.01])  # a routing bias that changes some tokens' experts (checked below)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_moe_equals_a_loop_over_tokens_in_values_and_grads(variant):
    top_k, options = VARIANTS[variant]
    moe = moe_of(top_k, aux=0.0, **options)
    flat = torch.randn(18, 32, generator=torch.Generator().manual_seed(0))
    if moe.expert_bias is not None:
        unbiased = moe.route(flat)[3]
        moe.expert_bias.copy_(BIAS[:moe.n_experts])
        assert not torch.equal(moe.route(flat)[3], unbiased)  # the bias moves some tokens to other experts
    if moe.groups > 1:
        moe.groups = 1
        anywhere = moe.route(flat)[3]
        moe.groups = options["moe_router_groups"]
        assert not torch.equal(moe.route(flat)[3], anywhere)  # the groups keep some tokens from their top k
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = moe(x)
    assert out.shape == x.shape
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    ours = {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in moe.named_parameters()}}
    x.grad = None
    moe.zero_grad()
    reference = token_by_token(moe, x)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    reference.backward(grad)
    theirs = {"x": x.grad, **{n: p.grad if p.grad is not None else torch.zeros_like(p)  # (an expert the loop
                              for n, p in moe.named_parameters()}}                    # never ran: zero)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def kept_by_hand(moe: MoE, x: torch.Tensor, factor: float, by_probs: bool) -> set:
    """The (token, choice) pairs each expert keeps under a capacity, by a plain loop over experts."""
    _, _, weights, chosen = moe.route(x.reshape(-1, x.shape[-1]))
    pairs = [(t, j) for t in range(chosen.shape[0]) for j in range(moe.top_k)]
    limit = max(1, math.ceil(factor * len(pairs) / moe.n_experts))
    kept = set()
    for e in range(moe.n_experts):
        mine = [pair for pair in pairs if int(chosen[pair]) == e]
        if by_probs:
            mine.sort(key=lambda pair: -float(weights[pair]))  # stable: ties keep token order
        kept |= set(mine[:limit])
    return kept


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_a_capacity_drops_what_each_expert_cannot_take_in_values_and_grads(policy):
    """With model.moe_capacity_factor=0.5 each expert keeps ceil(0.5 T k / E) pairs: those with the highest
    router weights (probs) or the earliest tokens (position); a dropped pair adds nothing, and the rest is the
    dropless block's. Evaluation keeps every pair."""
    moe = moe_of(2, aux=0.0, moe_capacity_factor=0.5, moe_drop_policy=policy, moe_shared_ffn_dim=40)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(7), requires_grad=True)
    kept = kept_by_hand(moe, x.detach(), 0.5, policy == "probs")
    assert 0 < len(kept) < 36  # some pairs are dropped, some kept
    assert kept != kept_by_hand(moe, x.detach(), 0.5, policy != "probs")  # and the policy decides which
    out = moe(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
    out.backward(grad)
    ours = {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in moe.named_parameters()}}
    assert float(moe.balance[2]) == pytest.approx(1 - len(kept) / 36)  # the share dropped, for the metrics
    x.grad = None
    moe.zero_grad()
    rows = []
    for t, token in enumerate(x.reshape(-1, 32)):
        probs = F.softmax(token @ moe.router.weight.T, dim=-1)
        top, chosen = probs.topk(2)
        top = top / top.sum()
        row = sum(w * moe.experts[str(int(e))](token[None])[0] for j, (w, e) in enumerate(zip(top, chosen))
                  if (t, j) in kept)
        rows.append(row + torch.sigmoid(token @ moe.shared_gate.weight[0]) * moe.shared(token[None])[0])
    reference = torch.stack(rows).view_as(x)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    reference.backward(grad)
    theirs = {"x": x.grad, **{n: p.grad for n, p in moe.named_parameters()}}
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    moe.eval()
    dropless = moe_of(2, aux=0.0, moe_shared_ffn_dim=40).eval()
    torch.testing.assert_close(moe(x), dropless(x), rtol=0, atol=0)


def test_an_expert_no_token_chose_still_gets_a_zero_grad():
    """Data-parallel buckets fill only when every parameter has a grad: the unchosen expert runs on zero rows."""
    moe = moe_of(top_k=1)
    with torch.no_grad():
        moe.router.weight[3] = -1.0  # on positive inputs, never the top choice
    x = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(2)).abs() + 0.1
    moe(x).square().sum().backward()
    _, _, _, chosen = moe.route(x.reshape(-1, 32))
    assert 3 not in chosen.tolist()
    for name, param in moe.experts["3"].named_parameters():
        assert param.grad is not None and torch.count_nonzero(param.grad) == 0, name
    assert all(torch.count_nonzero(p.grad) > 0 for p in moe.experts["0"].parameters())


def test_the_load_balancing_loss_is_one_when_even_and_grows_when_skewed():
    even = torch.full((8, 4), 0.25)
    assert load_balancing_loss(even, torch.tensor([4, 4, 4, 4])).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 8)
    assert load_balancing_loss(skewed, torch.tensor([8, 8, 0, 0])).item() == pytest.approx(4 * 0.5 * 0.7
                                                                                              + 4 * 0.5 * 0.1)


def balance_by_hand(probs: torch.Tensor, chosen: torch.Tensor, per_sequence: int = 0) -> torch.Tensor:
    """The balancing loss of these tokens' probs [T, E] and choices [T, k], or with `per_sequence` = b the mean
    of each of b sequences' own."""
    if per_sequence:
        return torch.stack([balance_by_hand(p, c) for p, c in zip(probs.chunk(per_sequence), chosen.chunk(per_sequence))
                            ]).mean()
    return load_balancing_loss(probs, torch.bincount(chosen.reshape(-1), minlength=probs.shape[-1]))


@pytest.mark.parametrize("grad_scale,z_loss,kind,score", [
    (1.0, 0.0, "aux_loss", "softmax"), (0.25, 0.0, "aux_loss", "softmax"), (1024.0, 0.0, "aux_loss", "softmax"),
    (0.25, 0.2, "aux_loss", "softmax"), (0.25, 0.0, "seq_aux_loss", "softmax"),
    (1.0, 0.2, "global_aux_loss", "softmax"),
    (0.25, 0.2, "seq_aux_loss", "sigmoid")])
def test_the_aux_gradient_equals_adding_the_loss_at_the_main_loss_scale(grad_scale, z_loss, kind, score):
    """The block's output grad passes through, and the router gets coef x scale x d aux: the same grads as
    backpropagating (main + coef x aux + z coef x router z-loss) x scale (the trainer's scale: 1/micro-batches
    times fp16's). seq_aux_loss: aux is the mean over the 2 sequences of each one's balancing loss (which differs
    from the micro-batch's); global_aux_loss in one process: the micro-batch's. Sigmoid scores: the loss takes them
    normalized over the experts."""
    moe = moe_of(aux=0.3, moe_z_loss=z_loss, moe_aux_loss_type=kind, moe_score_function=score)
    moe.aux_grad_scale = grad_scale
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(4), requires_grad=True)
    moe(x).sum().mul(grad_scale).backward()
    ours = [x.grad.clone()] + [p.grad.clone() for p in moe.parameters()]
    x.grad = None
    moe.zero_grad()
    moe.aux_loss = moe.z_loss = 0.0

    def by_hand(aux_coef: float, z_coef: float) -> torch.Tensor:
        flat = x.reshape(-1, 32)
        _, probs, _, chosen = moe.route(flat)
        probs = probs / probs.sum(-1, keepdim=True) if score == "sigmoid" else probs
        aux = balance_by_hand(probs, chosen, 2 if kind == "seq_aux_loss" else 0)
        z = (flat @ moe.router.weight.T).logsumexp(-1).square().mean()  # ST-MoE's z-loss
        return (moe(x).sum() + aux_coef * aux + z_coef * z) * grad_scale

    by_hand(0.3, z_loss).backward()
    theirs = [x.grad] + [p.grad for p in moe.parameters()]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a / grad_scale, b / grad_scale, rtol=1e-5, atol=1e-7)
    router_without = torch.autograd.grad(by_hand(0.3, 0.0), moe.router.weight)[0]
    assert torch.allclose(router_without / grad_scale, ours[1] / grad_scale, rtol=1e-5, atol=1e-7) == (not z_loss)
    router_without = torch.autograd.grad(by_hand(0.0, 0.0), moe.router.weight)[0]
    assert not torch.allclose(router_without, ours[1], rtol=1e-3)  # the aux term did reach the router
    _, probs, _, chosen = moe.route(x.detach().reshape(-1, 32))
    probs = probs / probs.sum(-1, keepdim=True) if score == "sigmoid" else probs
    per_sequence, whole = balance_by_hand(probs, chosen, 2), balance_by_hand(probs, chosen)
    assert abs(per_sequence - whole) > 1e-3  # the two scopes differ on these tokens
    recorded = moe.balance[0] / moe.balance[3]  # the mean over the forwards above, all of the same tokens
    assert recorded == pytest.approx(float(per_sequence if kind == "seq_aux_loss" else whole), rel=1e-6)


def test_the_routing_bias_moves_toward_the_experts_a_step_under_used():
    """Aux-loss-free balancing: after an update each bias moves by rate x sign(mean load - load), the loads being
    the pairs the router asked of each expert over the step's forwards (not those of evaluation)."""
    from plait.train.moe import max_violation, step_loads, update_expert_bias

    moe = moe_of(2, moe_bias_update_rate=0.01)
    moe.expert_bias.copy_(BIAS)
    batches = [torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(seed)) for seed in (11, 12)]
    loads = sum(torch.bincount(moe.route(x.reshape(-1, 32))[3].reshape(-1), minlength=4) for x in batches)
    for x in batches:
        moe(x)
    moe.eval()(batches[0])  # evaluation counts nothing
    assert torch.equal(moe.load, loads)
    counted = step_loads([moe])
    assert torch.equal(counted, loads[None].float()) and int(moe.load.sum()) == 0  # read, and counting restarts
    assert float(max_violation(counted)[0]) == pytest.approx(float(loads.max() / loads.float().mean() - 1))
    update_expert_bias([moe], counted)
    expected = BIAS + 0.01 * torch.sign(loads.float().mean() - loads.float())
    torch.testing.assert_close(moe.expert_bias, expected, rtol=0, atol=1e-9)
    assert len(set(torch.sign(loads.float().mean() - loads.float()).tolist())) > 1  # some up, some down


def test_muon_steps_the_experts_and_shared_expert_and_adamw_the_router_and_gate():
    """Muon takes the hidden matrices: each expert's and the shared expert's (both dimensions grow with width);
    the router and the shared expert's gate (only their input grows) step with AdamW."""
    from plait.train.config import OptimConfig
    from plait.train.parametrization import build_parametrization

    cfg = ModelConfig(**SMALL, moe_experts=4, moe_shared_ffn_dim=40)
    group_of = build_parametrization(cfg, OptimConfig(name="muon")).group_of
    muon = {name for name, _ in build_model(cfg).named_parameters() if group_of(name, None).get("muon")}
    assert {"layers.0.mlp.shared.w13.weight", "layers.0.mlp.shared.w2.weight", "layers.1.mlp.experts.3.w2.weight",
            "layers.1.mlp.experts.0.w13.weight"} <= muon
    assert not muon & {"layers.0.mlp.router.weight", "layers.0.mlp.shared_gate.weight"}


def test_evaluation_adds_no_aux_gradient():
    moe = moe_of(aux=0.5).eval()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(5))
    moe(x).sum().backward()
    trained = moe_of(aux=0.0).eval()
    trained(x).sum().backward()
    torch.testing.assert_close(moe.router.weight.grad, trained.router.weight.grad, rtol=0, atol=0)


def exported(tmp_path, scales=Scales(), **features):
    """A small MoE model (router rows spread, so routing is decided by clear margins) exported as Hugging Face."""
    from plait.parallel.grid import Grid
    from plait.parallel.plans import param_specs
    from plait.train.checkpoint import SaveRequest, layout_meta, model_meta, save
    from plait.train.export import export_checkpoint

    cfg = ModelConfig(**{**SMALL, "moe_experts": 4, "moe_top_k": 2, **features})
    model = build_model(cfg, seed=5, scales=scales).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("router.weight"):
                param.mul_(20)
            if name.endswith("bias"):  # q, k, v biases start at zero: give them values an export could lose
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    grid = Grid.single()
    request = SaveRequest(3, dict(model.named_parameters()), param_specs(model),
                          meta={**layout_meta(grid), **model_meta(cfg, scales)})
    return cfg, model, export_checkpoint(save(tmp_path / "ckpt", grid, request), tmp_path / "hf")


MUP_SCALES = Scales(2.0, 0.5, router=0.5)  # muP's multipliers at width 2x base, folded into the export exactly
FAMILIES = {  # name: (the architecture transformers builds, plait's settings, the forward multipliers)
    "mixtral": ("MixtralForCausalLM", {}, Scales()),
    "mixtral-window8": ("MixtralForCausalLM", {"sliding_window": 8}, Scales()),
    "qwen3-moe": ("Qwen3MoeForCausalLM", {"qk_norm": True, "moe_norm_topk": False}, Scales()),
    "qwen3-moe-normalized": ("Qwen3MoeForCausalLM", {"qk_norm": True}, Scales()),
    "qwen2-moe": ("Qwen2MoeForCausalLM", {"qkv_bias": True, "moe_shared_ffn_dim": 40, "moe_norm_topk": False},
                  Scales()),
    "qwen2-moe-no-bias": ("Qwen2MoeForCausalLM", {"moe_shared_ffn_dim": 40}, Scales()),
    "qwen2-moe-mup": ("Qwen2MoeForCausalLM", {"moe_shared_ffn_dim": 40}, MUP_SCALES),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_matches_transformers_mixtral_qwen2_moe_and_qwen3_moe(family, tmp_path):
    """Mixtral (with or without a window), Qwen3-MoE (QK-norm; top-k renormalized or not) and Qwen2-MoE (a gated
    shared expert; q, k, v biases or none; muP's multipliers, the router's and the shared gate's among them, folded
    into the weights): transformers' own model on the export gives plait's logits and greedy tokens, its config
    reads back as the same plait settings, and the export and transformers' re-save load back bit for bit."""
    transformers = pytest.importorskip("transformers")
    from plait.train.decode import generate
    from plait.train.export import init_from_hf

    architecture, features, scales = FAMILIES[family]
    cfg, model, out = exported(tmp_path, scales, **features)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True,
                                                           dtype=torch.float32).eval()
    assert type(hf).__name__ == architecture
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids)[..., :300], hf(ids).logits
        assert ((ours - theirs).abs().max() / ours.abs().max()) < 1e-5
        prompt = ids[:, :4]
        hf_out = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0,
                             eos_token_id=None, attention_mask=torch.ones_like(prompt))
    assert torch.equal(generate(model, prompt, 20, temperature=0), hf_out)
    import json
    from plait.train.export import model_config_from_hf

    read = model_config_from_hf(json.loads((out / "config.json").read_text()))  # what plait generate/eval build
    keys = ("moe_experts", "moe_top_k", "moe_aux_loss", "moe_norm_topk", "moe_shared_ffn_dim", "sliding_window",
            "qk_norm", "qkv_bias", "ffn_dim")
    assert {key: getattr(read, key) for key in keys} == {key: getattr(cfg, key) for key in keys}
    for directory in (out, tmp_path / "resaved"):  # the Hub's per-expert names, and transformers' own save
        if directory != out:
            hf.save_pretrained(directory)
        fresh = build_model(cfg, seed=9, scales=scales)
        init_from_hf(fresh, directory)
        for (name, a), b in zip(fresh.named_parameters(), model.parameters()):
            assert torch.equal(a, b), name


STEPS = 4
BASE = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=96",
        "model.moe_experts=4", "model.moe_top_k=2", "model.moe_aux_loss=0.1", "model.moe_z_loss=0.01",
        "model.moe_shared_ffn_dim=32", "model.moe_bias_update_rate=0.02",
        "train.seq_len=32", "train.batch_size=8", "train.progress=false", "train.peak_flops=1e10",
        "optim.warmup_steps=1", "optim.lr=3e-3", "train.eval_every=0", "checkpoint.save_final=false"]
# The load-balancing loss is taken per micro-batch on each rank, as Megatron takes it: the one-process
# reference runs the same micro-batches (2 of 4 sequences). Context parallelism splits each sequence's tokens
# over ranks, so under cp the loss is over each rank's share: that layout is held to one process without it.
LAYOUTS = {  # name: (world size, overrides)
    "tp2-sp-pp2": (4, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.pp=2", "parallel.microbatches=2"]),
    "tp2-dp2-zero1": (4, ["parallel.tp=2", "parallel.zero=1", "parallel.bucket_mb=0.01"]),
    "pp2-interleaved-dp2-zero3": (4, ["parallel.pp=2", "parallel.vpp=2", "parallel.microbatches=1", "parallel.zero=3"]),
    "pp2-zbv": (2, ["parallel.pp=2", "parallel.schedule=zbv", "parallel.microbatches=2"]),
    "tp2-sp-ep2": (4, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=2", "parallel.bucket_mb=0.01"]),
    # A capacity drops by position here: by router weight, a pair at the edge of an expert's capacity swaps places
    # with one whose weight differs in the last bit once a layout's sums round otherwise (the loop test holds that
    # policy exactly).
    # DeepSeek-V3's router (sigmoid scores, scaled weights) and its per-sequence balancing loss ride along.
    # (with its node-limited routing: the groups are the ep ranks' experts, each token's rows go to one of them)
    "tp2-sp-ep2-capacity-sigmoid": (4, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=2",
                                        "model.moe_capacity_factor=0.75", "model.moe_drop_policy=position",
                                        "model.moe_score_function=sigmoid", "model.moe_topk_scaling_factor=2.5",
                                        "model.moe_aux_loss_type=seq_aux_loss", "model.moe_router_groups=2",
                                        "model.moe_router_group_topk=1"]),
    "pp2-capacity-seq-ungated": (2, ["parallel.pp=2", "parallel.microbatches=2", "model.moe_capacity_factor=0.75",
                                     "model.moe_drop_policy=position", "model.moe_aux_loss_type=seq_aux_loss",
                                     "model.moe_shared_gate=false"]),
    "pp2-ep2": (4, ["parallel.pp=2", "parallel.ep=2", "parallel.microbatches=1"]),
    "ep2-cp2-no-aux": (4, ["parallel.ep=2", "parallel.cp=2", "model.moe_aux_loss=0"]),
    "ep2-dp4-no-aux": (4, ["parallel.ep=2", "parallel.bucket_mb=0.01", "model.moe_aux_loss=0"]),
    "ep2-dp4-zero1-no-aux": (4, ["parallel.ep=2", "parallel.zero=1", "parallel.bucket_mb=0.01",
                                 "parallel.overlap_param_gather=true", "model.moe_aux_loss=0"]),
    "ep2-dp4-zero2-no-aux": (4, ["parallel.ep=2", "parallel.zero=2", "model.moe_aux_loss=0"]),
    "pp2-zbv-ep2-zero3-no-aux": (4, ["parallel.pp=2", "parallel.schedule=zbv", "parallel.microbatches=2",
                                     "parallel.ep=2", "parallel.zero=3", "model.moe_aux_loss=0"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    return train_steps(0, 1, BASE, ["parallel.microbatches=2"], tmp_path_factory.mktemp("one"), cache, STEPS), cache


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_train_as_one_process(layout, reference, tmp_path):
    """Expert parallelism among them: each of 2 ep ranks holds 2 of the 4 experts and sends its rows to theirs."""
    (losses, norms, val), cache = reference
    world, overrides = LAYOUTS[layout]
    model = [override for override in overrides if override.startswith("model.")]
    if model:  # the one-process reference with the same model
        losses, norms, val = train_steps(0, 1, BASE, ["parallel.microbatches=2", *model], tmp_path / "one", cache,
                                         STEPS)
        assert abs(norms[-1] - reference[0][1][-1]) > 1e-4  # the setting changes the grads
    for rank_losses, rank_norms, rank_val in run_ranks(world, train_steps, BASE, overrides, tmp_path / "many",
                                                       cache, STEPS):
        assert rank_losses == pytest.approx(losses, rel=1e-5)
        assert rank_norms == pytest.approx(norms, rel=1e-5)
        assert rank_val == pytest.approx(val, rel=1e-5)


# global_aux_loss counts the loads of every dp x cp rank's share of the micro-batch: where dp or cp splits one
# process's micro-batch (one micro-batch a step here), the layout trains as that process with the balancing loss
# on, which aux_loss (each rank its own loads) does not.
GLOBAL = ["model.moe_aux_loss_type=global_aux_loss"]
GLOBAL_LAYOUTS = {  # name: (world size, overrides)
    "ep2-dp4": (4, ["parallel.ep=2", "parallel.bucket_mb=0.01"]),
    "ep2-cp2": (4, ["parallel.ep=2", "parallel.cp=2"]),
    "tp2-sp-dp2-zero2": (4, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero=2"]),
}


@pytest.fixture(scope="module")
def global_reference(tmp_path_factory, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    return train_steps(0, 1, BASE, GLOBAL, tmp_path_factory.mktemp("one-global"), cache, STEPS), cache


@pytest.mark.parametrize("layout", list(GLOBAL_LAYOUTS))
def test_global_balancing_trains_as_one_process_where_ranks_split_the_micro_batch(layout, global_reference,
                                                                                   tmp_path):
    expected, cache = global_reference
    world, overrides = GLOBAL_LAYOUTS[layout]
    for rank_losses, rank_norms, rank_val in run_ranks(world, train_steps, BASE, [*GLOBAL, *overrides],
                                                       tmp_path / "many", cache, STEPS):
        assert rank_losses == pytest.approx(expected[0], rel=1e-5)
        assert rank_norms == pytest.approx(expected[1], rel=1e-5)
        assert rank_val == pytest.approx(expected[2], rel=1e-5)
    if layout == "ep2-dp4":  # each rank's own loads: the grads are another model's
        local = run_ranks(world, train_steps, BASE, overrides, tmp_path / "local", cache, STEPS)[0]
        one = train_steps(0, 1, BASE, [], tmp_path / "one-local", cache, STEPS)
        assert abs(local[1][-1] - one[1][-1]) > 1e-4 * abs(one[1][-1])


def test_the_trainer_weighs_each_micro_batch_balancing_loss_as_its_loss(tmp_path, stdlib_tokens):
    """A step's grads are those of the mean over its micro-batches of (cross-entropy + coef x balancing loss +
    z coef x router z-loss); the metrics are the two losses' means over layers and micro-batches."""
    from train_utils import make_trainer

    cache = stdlib_tokens[0].parent.parent
    trainer = make_trainer(0, 1, BASE, ["parallel.microbatches=2", "optim.grad_clip=0", "model.moe_aux_loss=0.5",
                                        "model.moe_z_loss=0.2"], tmp_path, cache)
    model = trainer.chunks[0]
    theirs = {}
    trainer.optimizer.step = lambda: theirs.update({name: param.grad.clone()  # the grads the update would take
                                                    for name, param in model.named_parameters()})
    record = trainer.step()
    model.zero_grad()
    batch = trainer.loader.batch(0)
    for layer in trainer.moe_layers:
        layer.aux_loss = layer.z_loss = 0.0  # both are added by hand below
        layer.expert_bias.zero_()  # as it was in the step (the step's update moved it after the grads were taken)
    every_aux, every_z = [], []

    def by_hand(module, args, logits):
        probs = logits.float().softmax(-1)
        every_aux.append(load_balancing_loss(probs, torch.bincount(probs.topk(2).indices.reshape(-1), minlength=4)))
        every_z.append(logits.float().logsumexp(-1).square().mean())

    hooks = [layer.router.register_forward_hook(by_hand) for layer in trainer.moe_layers]
    for micro in batch:
        first = len(every_aux)
        loss = model.loss(model(micro[:, :-1]), micro[:, 1:])
        loss = loss + 0.5 * sum(every_aux[first:]) + 0.2 * sum(every_z[first:])
        (loss / len(batch)).backward()
    for hook in hooks:
        hook.remove()
    trainer.close()
    assert len(every_aux) == 8 and record["moe_balance"] == pytest.approx(float(sum(every_aux)) / 8, rel=1e-6)
    assert record["moe_z_loss"] == pytest.approx(float(sum(every_z)) / 8, rel=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(theirs[name], param.grad, rtol=1e-5, atol=1e-6)


def test_a_mixtral_directory_and_a_dense_model_refuse_each_other(tmp_path):
    from plait.train.export import CheckpointError, init_from_hf

    _, _, out = exported(tmp_path)
    dense = r"is model_type=mixtral with 4 experts \(top 2\) but model.moe_experts=0; set model.moe_experts=4 " \
            r"model.moe_top_k=2 to load it\.$"
    with pytest.raises(CheckpointError, match=dense):
        init_from_hf(build_model(ModelConfig(**SMALL)), out)
    top_1 = r"with 4 experts \(top 2\) but model.moe_experts=4 \(model.moe_top_k=1\)"
    with pytest.raises(CheckpointError, match=top_1):
        init_from_hf(build_model(ModelConfig(**SMALL, moe_experts=4, moe_top_k=1)), out)


def test_qwen_moe_directories_refuse_models_that_route_otherwise_in_one_line(tmp_path):
    """A Qwen2-MoE or Qwen3-MoE directory names the setting that differs: top-k renormalization, the shared expert's
    width, the attention's QK-norm; dense layers between the experts are refused; and exports no architecture has
    are refused before anything is written."""
    import json

    from plait.train.export import CheckpointError, init_from_hf

    _, _, qwen2 = exported(tmp_path / "qwen2", qkv_bias=True, moe_shared_ffn_dim=40, moe_norm_topk=False)
    base = {**SMALL, "moe_experts": 4, "moe_top_k": 2, "qkv_bias": True}
    with pytest.raises(CheckpointError, match=r"is model_type=qwen2_moe with norm_topk_prob=False but model."
                                              r"moe_norm_topk=True; set model.moe_norm_topk=False to load it\.$"):
        init_from_hf(build_model(ModelConfig(**base, moe_shared_ffn_dim=40)), qwen2)
    with pytest.raises(CheckpointError, match=r"with shared_expert_intermediate_size=40 but model.moe_shared_ffn_dim"
                                              r"=24; set model.moe_shared_ffn_dim=40 to load it\.$"):
        init_from_hf(build_model(ModelConfig(**base, moe_shared_ffn_dim=24, moe_norm_topk=False)), qwen2)
    _, _, qwen3 = exported(tmp_path / "qwen3", qk_norm=True)
    with pytest.raises(CheckpointError, match=r"is model_type=qwen3_moe, with QK-norm, but model.qk_norm=False; "
                                              r"set model.qk_norm=True to load it\.$"):
        init_from_hf(build_model(ModelConfig(**SMALL, moe_experts=4, moe_top_k=2)), qwen3)
    config = json.loads((qwen3 / "config.json").read_text())
    (qwen3 / "config.json").write_text(json.dumps({**config, "mlp_only_layers": [1]}))
    with pytest.raises(CheckpointError, match=r"mlp_only_layers=\[1\] and decoder_sparse_step=1 give some layers a "
                                              r"dense MLP \(every plait block has experts\); plait's decoder cannot"):
        init_from_hf(build_model(ModelConfig(**SMALL, moe_experts=4, moe_top_k=2, qk_norm=True)), qwen3)
    for name, features, fragment in (
            ("bias", {"qkv_bias": True}, "a model with model.moe_experts and model.qkv_bias has no Hugging Face "
                                         "architecture plait writes"),
            ("unnormalized", {"moe_norm_topk": False}, "Mixtral renormalizes each token's top-k router weights but "
                                                       "model.moe_norm_topk=false"),
            ("biased", {"moe_bias_update_rate": 0.001}, "model.moe_bias_update_rate=0.001 routed by a learned bias per "
                                                        "expert \\(DeepSeek-V3's\\) that MixtralForCausalLM has no "
                                                        "place for"),
            ("sigmoid", {"moe_score_function": "sigmoid"}, "model.moe_score_function=sigmoid routes as DeepSeek-V3 "
                                                           "does, which no export family"),
            ("scaled", {"moe_topk_scaling_factor": 2.5}, "model.moe_topk_scaling_factor=2.5 routes as DeepSeek-V3"),
            ("grouped", {"moe_router_groups": 2}, "model.moe_router_groups=2 routes as DeepSeek-V3")):
        with pytest.raises(CheckpointError, match=fragment):
            exported(tmp_path / name, **features)
        assert not (tmp_path / name / "hf").exists()


@pytest.mark.parametrize("backend", ["file", "recompute"])
def test_offloaded_or_recomputed_experts_train_as_kept_ones(backend, tmp_path, stdlib_tokens):
    """Every saved tensor of the experts (int64 indices, an unchosen expert's empty rows) goes to the file and
    back, or is recomputed with the same routing: the same losses and grads as keeping them."""
    cache = stdlib_tokens[0].parent.parent
    small = ["model.n_layers=2", "train.batch_size=4"]
    from train_utils import make_trainer

    kept = train_steps(0, 1, BASE, small, tmp_path / "kept", cache, 2, 0)
    trainer = make_trainer(0, 1, BASE, small + [f"offload={backend}", "offload.keep_last=0", "offload.min_bytes=0",
                                                "offload.device_filter=all", f"offload.path={tmp_path}"],
                           tmp_path / backend, cache)
    records = [trainer.step() for _ in range(2)]
    trainer.close()
    assert [r["loss"] for r in records] == kept[0] and [r["grad_norm"] for r in records] == kept[1]
    if backend == "file":
        assert min(r["offload_written_bytes"] for r in records) > 0


def test_global_balancing_under_recompute_trains_as_kept(tmp_path, stdlib_tokens):
    """A recomputed block all-reduces its loads again during backward, on every rank alike, and takes the same
    loss from them (the loads are the micro-batch's, not a running count): dp2 trains bit for bit as keeping."""
    cache = stdlib_tokens[0].parent.parent
    common = [*GLOBAL, "model.n_layers=2", "train.batch_size=4"]
    kept = run_ranks(2, train_steps, BASE, common, tmp_path / "kept", cache, 2, 0)
    recomputed = run_ranks(2, train_steps, BASE, common + ["offload=recompute", "offload.keep_last=0",
                                                           "offload.min_bytes=0", "offload.device_filter=all",
                                                           f"offload.path={tmp_path}"], tmp_path / "recomputed",
                           cache, 2, 0)
    assert recomputed == kept


def _save_then_resume(rank, world, save_overrides, resume_overrides, run_dir, cache):
    """Train 2 steps under `save_overrides` and save (when given); else resume under `resume_overrides` to step
    4. Returns (the local expert ids of layer 0, the resumed losses or None)."""
    from train_utils import make_trainer

    overrides = save_overrides if save_overrides is not None else resume_overrides + ["train.resume=auto"]
    trainer = make_trainer(rank, world, BASE, overrides + ["train.steps=4"], run_dir, cache)
    held = sorted(int(key) for key in trainer.chunks[0].layers["0"].mlp.experts.keys())
    if save_overrides is not None:
        [trainer.step() for _ in range(2)]
        trainer.save_checkpoint()
        trainer.close()
        return held, None
    losses = [trainer.step()["loss"] for _ in range(2)]
    trainer.close()
    return held, losses


@pytest.mark.parametrize("saver,resumer", [("ep2", "one"), ("one", "ep2-dp4-zero1"), ("ep2-dp4-zero3", "one")])
def test_an_expert_parallel_checkpoint_resumes_in_one_process_and_back(saver, resumer, tmp_path, stdlib_tokens):
    """Each ep rank writes its own experts under their global names (under ZeRO-1, gathered from the ranks holding
    them): the checkpoint holds all of them, and a run under the other layout resumes it with the losses of a
    run that never stopped (every layout runs micro-batches of 2 sequences)."""
    from plait.train.checkpoint import latest_checkpoint, read_index

    cache = stdlib_tokens[0].parent.parent
    layouts = {"one": (1, ["parallel.microbatches=4"]), "ep2": (2, ["parallel.ep=2", "parallel.microbatches=2"]),
               "ep2-dp4-zero1": (4, ["parallel.ep=2", "parallel.zero=1", "parallel.bucket_mb=0.01"]),
               "ep2-dp4-zero3": (4, ["parallel.ep=2", "parallel.zero=3"])}
    straight = train_steps(0, 1, BASE, ["parallel.microbatches=4", "train.steps=4"], tmp_path / "straight", cache,
                           4, 0)[0]
    world, overrides = layouts[saver]
    held = run_ranks(world, _save_then_resume, overrides, None, tmp_path / "run", cache)
    if saver != "one":  # each ep rank holds half the experts
        assert [ids for ids, _ in held] == [[0, 1], [2, 3]] * (world // 2)
    index = read_index(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert {f"layers.3.mlp.experts.{e}.w13.weight" for e in range(4)} <= set(index["params"])
    assert {f"layers.3.mlp.experts.{e}.w2.weight" for e in range(4)} <= set(index["optimizer_state"])
    world, overrides = layouts[resumer]
    for _, losses in run_ranks(world, _save_then_resume, None, overrides, tmp_path / "run", cache):
        assert losses == pytest.approx(straight[2:], rel=1e-5)
    # the routing biases (aux-loss-free balancing) are in it too, and `plait generate` / `plait eval` load them
    from plait.train.decode import load_model
    from plait.train.reshard import ShardReader

    saved = latest_checkpoint(tmp_path / "run" / "checkpoints")
    bias = ShardReader(saved).full_param("layers.3.mlp.expert_bias")
    assert float(bias.abs().max()) > 0 and torch.equal(load_model(saved, torch.device("cpu"))[0].layers["3"].mlp.
                                                       expert_bias, bias)


EVEN = ["model=tiny", "model.moe_experts=4", "model.moe_top_k=2", "train.seq_len=64", "train.batch_size=8",
        "parallel.ep=2", "train.progress=false", "train.peak_flops=1e10", "train.eval_every=0",
        "checkpoint.save_final=false"]


def _exchanged_bytes(rank, world, precision, run_dir, cache):
    """Bytes this rank sends to the other ranks in the experts' all-to-alls of one step under an even routing:
    each router scores experts 0 and 2 alike and 1 and 3 alike, so every token picks one expert on each ep rank."""
    import torch.distributed as dist
    from train_utils import make_trainer

    trainer = make_trainer(rank, world, EVEN, [f"train.precision={precision}"], run_dir, cache)
    with torch.no_grad():
        for layer in trainer.moe_layers:
            direction = torch.randn(layer.router.weight.shape[1], generator=torch.Generator().manual_seed(7))
            layer.router.weight.copy_(torch.stack([direction, -direction, direction, -direction]))
    sent, real = [0], dist.all_to_all_single

    def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        share = input_split_sizes or [input.shape[0] // world] * world
        row = input.element_size() * (input[0].numel() if input.dim() else 1)
        sent[0] += sum(rows for peer, rows in enumerate(share) if peer != dist.get_rank(group)) * row
        return real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counted
    try:
        trainer.step()
    finally:
        dist.all_to_all_single = real
        trainer.close()
    return sent[0]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_plan_counts_what_the_expert_all_to_alls_send(precision, tmp_path, stdlib_tokens):
    """`plait plan`'s ep bytes are what the all-to-alls send under an even routing: the token rows (fp32, the
    residual stream) out and the experts' outputs (bf16 under autocast) back, their grads the same ways, and the
    row counts."""
    from plait.train.config import load_config
    from plait.train.plan import plan

    cache = stdlib_tokens[0].parent.parent
    sent = run_ranks(2, _exchanged_bytes, precision, tmp_path / "run", cache)
    planned = plan(load_config(EVEN + [f"train.precision={precision}", "launch.world_size=2"]), 2).stages[0].ep_bytes
    assert sent == [planned, planned] and planned > 0


METRICS = ("moe_balance", "moe_z_loss", "moe_dropped", "moe_max_violation")


def _balances(rank, world, overrides, run_dir, cache):
    from train_utils import make_trainer

    trainer = make_trainer(rank, world, BASE, overrides + ["model.moe_capacity_factor=0.75",
                                                           "model.moe_drop_policy=position"], run_dir, cache)
    records = [trainer.step() for _ in range(2)]
    trainer.close()
    return [[record[key] for key in METRICS] for record in records]


def test_the_balance_metric_is_one_process_s_under_tp_pp_and_ep(tmp_path, stdlib_tokens):
    """`moe_balance` (the mean balancing loss over layers, micro-batches and ranks), `moe_z_loss`, `moe_dropped`
    (the share of pairs over capacity) and `moe_max_violation` (the busiest expert's load over the mean, less 1)
    read the same under any layout that runs the same micro-batches; the balance lies in (0, E/k], the share
    dropped in (0, 1), the violation in (0, E/k - 1] (an expert takes at most one pair of each token)."""
    cache = stdlib_tokens[0].parent.parent
    one = _balances(0, 1, ["parallel.microbatches=2"], tmp_path / "one", cache)
    assert all(0.0 < balance <= 4 / 2 and z > 0 and 0 < dropped < 1 and 0 < violation <= 4 / 2 - 1
               for balance, z, dropped, violation in one)
    for world, overrides in ((4, LAYOUTS["tp2-sp-pp2"][1]), (2, ["parallel.ep=2"])):
        for metrics in run_ranks(world, _balances, overrides, tmp_path / f"w{world}", cache):
            for step, theirs in zip(metrics, one):
                assert step == pytest.approx(theirs, rel=1e-5)


MUON_LAYOUTS = {  # name: (world size, overrides); the balancing loss off where dp splits a micro-batch's sequences
    "tp2-sp-ep2": (4, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=2"]),
    "ep2-dp4-zero3-no-aux": (4, ["parallel.ep=2", "parallel.zero=3", "model.moe_aux_loss=0"]),
}


@pytest.mark.parametrize("layout", list(MUON_LAYOUTS))
def test_muon_under_expert_parallelism_trains_as_one_process(layout, tmp_path, stdlib_tokens):
    """Muon orthogonalizes each expert's matrices from the ranks holding it (their own `ShardedMatrices`), the rest
    from the whole grad group: the same steps as one process."""
    cache = stdlib_tokens[0].parent.parent
    world, overrides = MUON_LAYOUTS[layout]
    aux = [o for o in overrides if o.startswith("model.moe_aux_loss")]
    muon = ["optim=muon", "optim.muon_ns_dtype=float32"]  # (bf16 Newton-Schulz would round rounding differences up)
    losses, norms, val = train_steps(0, 1, BASE, [*muon, "parallel.microbatches=2", *aux], tmp_path / "one",
                                     cache, STEPS)
    for rank_losses, rank_norms, rank_val in run_ranks(world, train_steps, BASE, [*muon, *overrides],
                                                       tmp_path / "many", cache, STEPS):
        assert rank_losses == pytest.approx(losses, rel=1e-5)
        assert rank_norms == pytest.approx(norms, rel=1e-5)
        assert rank_val == pytest.approx(val, rel=1e-5)
