"""`train.precision=fp8`: the linear layers' float8 GEMMs (plait.parallel.float8).

- One GEMM against a reference written from the recipe (cast each operand with scale 448 / amax, or 57344 / amax
  for the grad; dequantize; multiply in fp64): forward, both grads, the bias, and the dtypes under bf16 autocast.
- The whole model at tp2, with and without sequence parallelism, and a mixture of experts at tp2 and ep2: the loss
  and every grad equal one process's float8 model, because a shard's amax is shared over tp (each rank casts with
  one process's scale).
- Which layers run float8; all-zero and empty inputs; a zero-bubble split backward and activation offload through
  float8 GEMMs, bit for bit against the whole backward and the kept activations.
- The trainer: fp8 trains a small model as bf16 does (the loss curves within 2%). The configs float8 cannot run
  are refused in one sentence (tests/test_bad_input.py).
"""

import pytest
import torch

from plait.parallel.float8 import Float8Gemm
from tests.dist_utils import run_ranks

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def dequantized(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the float8 GEMM sees of `t`, in fp64: t times 448 / amax (57344 for e5m2), cast, divided back."""
    scale = torch.finfo(dtype).max / t.abs().max().double()
    return (t.double() * scale).to(dtype).double() / scale


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize("shape", [(3, 16, 32), (5, 48)])
def test_float8_gemm_equals_the_recipe_forward_and_backward(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).requires_grad_()
    weight = (torch.randn(80, shape[-1], generator=gen) * 0.02).requires_grad_()
    bias = torch.randn(80, generator=gen).requires_grad_()
    grad = torch.randn(*shape[:-1], 80, generator=gen) * 1e-3

    y = Float8Gemm()(x, weight, bias)
    y.backward(grad)

    xd, wd, gd = dequantized(x.detach(), E4M3), dequantized(weight.detach(), E4M3), dequantized(grad, E5M2)
    assert rel(y, xd @ wd.t() + bias.double()) < 1e-6
    assert rel(x.grad, gd @ wd) < 1e-6
    assert rel(weight.grad, gd.reshape(-1, 80).t() @ xd.reshape(-1, shape[-1])) < 1e-6
    assert torch.equal(bias.grad, grad.reshape(-1, 80).sum(0))
    exact = x.detach().double() @ weight.detach().double().t() + bias.double()
    assert 1e-3 < rel(y, exact) < 0.1  # the cast is real, and small


def test_the_cpu_emulation_equals_torchs_scaled_mm():
    """The emulated GEMM (CPU) gives `_scaled_mm`'s numbers (which CUDA runs), for each operand pairing used."""
    from plait.common.compat import scaled_mm
    from plait.parallel.float8 import emulated_scaled_mm, to_float8

    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(32, 48, generator=gen), torch.randn(48, 16, generator=gen)
    for a_dtype in (E4M3, E5M2):
        aq, a_inverse = to_float8(a, a_dtype)
        bq, b_inverse = to_float8(b.t(), E4M3)  # column-major b
        expected = scaled_mm(aq, bq.t(), a_inverse, b_inverse, torch.float32)
        assert rel(emulated_scaled_mm(aq, bq.t(), a_inverse, b_inverse, torch.float32), expected) < 1e-6


def test_float8_gemm_under_bf16_autocast_rounds_once_and_keeps_each_grad_in_its_tensors_dtype():
    """Under autocast the output is the fp32-accumulated product rounded once to bf16 (as on CUDA), and each grad
    has its tensor's dtype."""
    x = torch.randn(4, 32, requires_grad=True)
    weight = torch.randn(16, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = Float8Gemm()(x, weight)
    y.float().sum().backward()
    assert (y.dtype, x.grad.dtype, weight.grad.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    assert torch.equal(y, Float8Gemm()(x, weight).to(torch.bfloat16))


@pytest.mark.parametrize("rows", [4, 0], ids=["zeros", "no-rows"])
def test_an_all_zero_or_empty_input_gives_zeros(rows):
    """All zeros cast to zeros (no division by a zero amax); an expert the router sent no token runs on none and
    its weight still gets a zero grad."""
    x = torch.zeros(rows, 32, requires_grad=True)
    weight = torch.randn(16, 32, requires_grad=True)
    y = Float8Gemm()(x, weight)
    y.sum().backward()
    assert torch.equal(y, torch.zeros(rows, 16)) and torch.equal(weight.grad, torch.zeros(16, 32))
    assert x.grad.shape == (rows, 32) and torch.isfinite(x.grad).all()


class Float8Block(torch.nn.Module):
    """x + down(gelu(up(x))) with float8 GEMMs (an MLP's shape)."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Parameter(torch.randn(64, 32) * 0.1)
        self.down = torch.nn.Parameter(torch.randn(32, 64) * 0.1)
        self.gemm = Float8Gemm()

    def forward(self, x):
        return x + self.gemm(torch.nn.functional.gelu(self.gemm(x, self.up)), self.down)


def test_a_zero_bubble_split_backward_through_float8_gemms_equals_the_whole_one_bitwise():
    """I (input grads) for two micro-batches, then their W (weight grads), as ZB-H1 orders them: the float8 GEMM
    is one autograd node on the input path, so W runs it again; every grad equals the whole backward's bit for
    bit."""
    import copy

    from plait.parallel.pipeline.split_backward import backward_input, backward_weight

    torch.manual_seed(0)
    split = Float8Block()
    whole = copy.deepcopy(split)
    pending = []
    for _ in range(2):
        x, grad = torch.randn(16, 32, requires_grad=True), torch.randn(16, 32)
        x_whole = x.detach().clone().requires_grad_()
        whole(x_whole).backward(grad)
        pending.append(backward_input(split(x), grad, [x]))
        assert torch.equal(x.grad, x_whole.grad) and split.up.grad is None
    for item in pending:
        backward_weight(item)
    assert torch.equal(split.up.grad, whole.up.grad) and torch.equal(split.down.grad, whole.down.grad)


def test_which_layers_run_float8():
    """Attention's, the MLP's, each expert's and the shared expert's GEMMs; not the head's, a router's or a gate's."""
    from plait.parallel.tensor import ColumnParallelLinear
    from plait.train.build import build_model
    from plait.train.config import ModelConfig

    cfg = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, ffn_dim=96, max_seq_len=64, moe_experts=4,
                      moe_shared_ffn_dim=32)
    model = build_model(cfg, seed=0, float8=True)

    def gemm_of(module):
        return module.run.gemm if isinstance(module, ColumnParallelLinear) else getattr(module, "gemm", None)

    float8 = sorted(name for name, module in model.named_modules() if isinstance(gemm_of(module), Float8Gemm))
    block = ["attn.wo", "attn.wqkv", *(f"mlp.experts.{e}.{w}" for e in range(4) for w in ("w13", "w2")),
             "mlp.shared.w13", "mlp.shared.w2"]
    assert float8 == sorted(f"layers.{i}.{name}" for i in range(2) for name in block)


def compare_layout(tag, cfg, grid, ids, reference, errors, sequence_parallel=False, grad_share=1.0):
    """Into `errors`: rel errors of a float8 model on `grid` against the one-process `reference` (its grads taken):
    the loss and each grad of this rank's shard (an expert's grad `grad_share` times its reference's)."""
    from plait.parallel.plans import param_specs
    from plait.parallel.tensor import allreduce_partial_grads
    from plait.train.build import build_model

    model = build_model(cfg, grid, seed=5, sequence_parallel=sequence_parallel, float8=True)
    loss = model.loss(model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    specs = param_specs(model)
    allreduce_partial_grads([p for n, p in model.named_parameters() if specs[n].tp_partial_grad], grid)
    errors[f"{tag}.loss"] = rel(loss.detach(), reference.loss(reference(ids[:, :-1]), ids[:, 1:]).detach())
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        ref_grad = ref_params[name].grad * (grad_share if ".experts." in name else 1.0)
        if ref_grad.shape != specs[name].full_shape:  # the vocabulary's padding rows: zero in both
            ref_grad = torch.cat([ref_grad, ref_grad.new_zeros(specs[name].full_shape[0] - ref_grad.shape[0],
                                                               *ref_grad.shape[1:])])
        errors[f"{tag}.grad.{name}"] = rel(param.grad, specs[name].shard(ref_grad, grid.tp_rank, grid.tp))


def model_worker(rank, world):
    """Float8 models against one process's, fp32 (autocast off): dense at tp2 with and without SP, a mixture of
    experts (with a shared expert) at tp2 with SP and at ep2. Returns rel errors by name."""
    from plait.parallel.grid import Grid
    from plait.train.build import build_model
    from plait.train.config import ModelConfig

    dense = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    moe = ModelConfig(**{**dense.__dict__, "moe_experts": 4, "moe_top_k": 2, "moe_shared_ffn_dim": 32,
                         "moe_aux_loss": 0.0})
    ids = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(3))
    references = {}
    for name, cfg in (("dense", dense), ("moe", moe)):
        references[name] = build_model(cfg, Grid.single(), seed=5, float8=True)
        references[name].loss(references[name](ids[:, :-1]), ids[:, 1:]).backward()
    plain = build_model(dense, Grid.single(), seed=5)
    plain.loss(plain(ids[:, :-1]), ids[:, 1:]).backward()
    dense_params = dict(references["dense"].named_parameters())
    errors = {f"plain.grad.{name}": rel(param.grad, dense_params[name].grad)
              for name, param in plain.named_parameters()}
    tp = Grid.build(tp=world)
    for sp in (False, True):
        compare_layout(f"dense.sp{int(sp)}", dense, tp, ids, references["dense"], errors, sequence_parallel=sp)
    compare_layout("moe.tp2-sp", moe, tp, ids, references["moe"], errors, sequence_parallel=True)
    # ep2: both ranks feed the same tokens, so each expert gets every row twice (once from each rank)
    compare_layout("moe.ep2", moe, Grid.build(tp=1, ep=world), ids, references["moe"], errors, grad_share=world)
    return errors


def test_float8_models_at_tp2_and_ep2_equal_one_process():
    for errors in run_ranks(2, model_worker):
        worst = max((v, k) for k, v in errors.items() if not k.startswith("plain"))
        assert worst[0] < 1e-5, worst
        assert any(".experts." in k for k in errors)
        # the float8 model is not the plain one: the check above can fail
        assert min(v for k, v in errors.items() if k.startswith("plain.grad.layers")) > 1e-2


def test_fp8_training_follows_bf16(tmp_path, stdlib_tokens):
    """The tiny model trained 30 steps on real text: fp8's losses stay within 2% of bf16's (and are not bf16's)."""
    from plait.train import Trainer, load_config

    losses = {}
    for precision in ("bf16", "fp8"):
        cfg = load_config(["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=128",
                           "train.seq_len=64", "train.batch_size=4", "train.steps=30", "train.eval_every=0",
                           "train.progress=false", "train.peak_flops=1e10", f"train.precision={precision}",
                           f"train.run_dir={tmp_path / precision}", f"data.cache_dir={stdlib_tokens[0].parent.parent}"])
        trainer = Trainer(cfg)
        losses[precision] = torch.tensor([trainer.step()["loss"] for _ in range(30)])
        trainer.close()
    bf16, fp8 = losses["bf16"], losses["fp8"]
    assert fp8[-5:].mean() < 0.8 * fp8[:3].mean()  # it trains
    assert ((fp8 - bf16).abs() / bf16).max() < 0.02, (fp8, bf16)
    assert (fp8[1:] - bf16[1:]).abs().max() > 1e-3  # the float8 GEMMs ran


@pytest.mark.parametrize("backend", ["host", "file"])
def test_offloaded_float8_activations_give_the_kept_runs_grads_bitwise(backend, tmp_path):
    """The float8 casts the backward keeps (one byte an element) go to host memory or files and come back intact."""
    from plait.offload.attach import ActivationOffload
    from plait.train.build import build_model
    from tests.offload_utils import TINY, batch, forward_backward, grads, offload_config

    tokens = batch()
    kept = build_model(TINY, seed=0, float8=True)
    forward_backward(kept, tokens, precision="fp8")
    model = build_model(TINY, seed=0, float8=True)
    offload = ActivationOffload(offload_config(backend, str(tmp_path)), None, torch.device("cpu"))
    offload.attach(model)
    metrics = forward_backward(model, tokens, precision="fp8", offload=offload)
    assert metrics["offload_offloaded_bytes"] > 0
    expected = grads(kept)
    assert all(torch.equal(grad, expected[name]) for name, grad in grads(model).items())
