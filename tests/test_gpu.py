"""Every CUDA path plait has, run on a GPU (`pytest -m gpu`; skipped without CUDA).

Beside the ones here, these live with their component: resume on CUDA and the CUDA RNG
(test_checkpoint.py), optimizer state placement on CUDA (test_optim_state.py), the
unified-tensor gather (test_data.py), the datasheet MFU peak (test_peaks.py).

CUDA kernels that accumulate with atomics (embedding backward, some reductions) are not
bitwise reproducible run to run, so model-level comparisons use a tight tolerance; the
Lion kernel, elementwise, is compared bit for bit.
"""

import logging

import pytest
import torch

from plait.offload.gds import gds_available
from plait.train.config import load_config
from plait.train.build import build_model
from tests.offload_utils import TINY, batch, forward_backward, grads, offload_config

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def cuda_model(seed: int = 0):
    return build_model(TINY, seed=seed, device=CUDA)


def cuda_offload_grads(tmp_path, backend: str, **settings):
    """(reference grads, offloaded grads, metrics) of one step on CUDA: offload of device tensors only."""
    tokens = batch().to(CUDA)
    reference = cuda_model()
    forward_backward(reference, tokens)
    from plait.offload.attach import ActivationOffload

    model = cuda_model()
    offload = ActivationOffload(offload_config(backend, str(tmp_path), device_filter="cuda", **settings), None, CUDA)
    offload.attach(model)
    metrics = forward_backward(model, tokens, offload=offload)
    return grads(reference), grads(model), metrics, offload


def assert_close_grads(expected, actual):
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("backend", ["host", "file"])
def test_offload_through_pinned_memory_on_a_side_stream(tmp_path, backend):
    expected, actual, metrics, offload = cuda_offload_grads(tmp_path, backend, keep_last=1)
    assert_close_grads(expected, actual)
    assert metrics["offload_written_bytes"] > 0
    staging = getattr(offload.store, "staging", None)
    assert staging is not None and isinstance(staging.side, torch.cuda.Stream)
    assert offload.store.pools() and all(pool.pinned for pool in offload.store.pools())
    offload.close()


@pytest.mark.skipif(not gds_available(), reason="GPUDirect Storage (DeepSpeed's GDS op, cuFile) not here")
def test_gpudirect_storage_offload(tmp_path):
    expected, actual, metrics, offload = cuda_offload_grads(tmp_path, "gds", keep_last=1)
    assert_close_grads(expected, actual)
    assert metrics["offload_written_bytes"] > 0
    offload.close()


def test_adaptive_keep_profiles_with_cuda_events(tmp_path):
    from plait.offload.adaptive import BlockTimer
    from plait.offload.attach import ActivationOffload

    tokens = batch().to(CUDA)
    model = cuda_model()
    offload = ActivationOffload(offload_config("host", None, device_filter="cuda", keep_last="auto"), None, CUDA)
    offload.attach(model)
    assert offload.timer.cuda and isinstance(offload.timer, BlockTimer) and offload.bandwidth > 1e8
    for _ in range(2):
        metrics = forward_backward(model, tokens, offload=offload)
    assert offload.plans and offload.plans[0].forward_s > 0 and metrics["offload_bound_bytes"] > 0
    offload.close()


def test_triton_lion_is_the_eager_rule_bitwise_on_cuda():
    pytest.importorskip("triton")
    from plait.optim.lion import Lion, foreach_lion

    torch.manual_seed(0)
    sizes = [1, 3, 4095, 4096, 4097, 100_003] + list(range(5, 200, 7))
    tensors = [torch.randn(n, device=CUDA, requires_grad=True) for n in sizes]
    ref_p = [t.detach().clone() for t in tensors]
    ref_m = [torch.zeros_like(t) for t in ref_p]
    optimizer = Lion([{"params": tensors[0::2], "lr": 3e-2, "weight_decay": 0.5},
                      {"params": tensors[1::2], "lr": 1e-2, "weight_decay": 0.0}], impl="auto")
    assert optimizer.impl == "triton"
    for _ in range(5):
        step_grads = [torch.randn(n, device=CUDA) for n in sizes]
        for t, g in zip(tensors, step_grads):
            t.grad = g
        optimizer.step()
        foreach_lion(ref_p[0::2], step_grads[0::2], ref_m[0::2], 3e-2, 0.5, 0.9, 0.99)
        foreach_lion(ref_p[1::2], step_grads[1::2], ref_m[1::2], 1e-2, 0.0, 0.9, 0.99)
    for i, t in enumerate(tensors):
        assert torch.equal(t.detach(), ref_p[i]), f"param {i} (size {sizes[i]})"
        assert torch.equal(optimizer.state[t]["exp_avg"], ref_m[i]), f"momentum {i}"


def test_rms_norm_uses_apex_when_importable(caplog):
    import importlib.util

    import torch.nn.functional as F

    from plait.train import model as model_lib

    model_lib._RMS_NORM = None
    with caplog.at_level(logging.INFO, logger="plait"):
        norm = model_lib.rms_norm_function()
    has_apex = importlib.util.find_spec("apex") is not None
    assert ("apex fused kernel" in caplog.text) == has_apex, caplog.text
    x, w = torch.randn(4, 7, 64, device=CUDA), torch.rand(64, device=CUDA) + 0.5
    torch.testing.assert_close(norm(x, w, 1e-5), F.rms_norm(x, (64,), w, 1e-5), rtol=1e-5, atol=1e-6)


def trainer_overrides(tmp_path, cache, *extra):
    return ["model=tiny", "model.n_layers=2", "model.dim=128", "model.n_heads=4", "train.seq_len=64",
            "train.batch_size=8", "train.steps=6", "train.eval_every=0", "train.log_every=1", "train.progress=false",
            "train.device=cuda", f"train.run_dir={tmp_path}", f"data.cache_dir={cache}", "optim.warmup_steps=2", *extra]


def losses_of(overrides, steps=3):
    from plait.train.trainer import Trainer

    trainer = Trainer(load_config(overrides))
    losses = [trainer.step()["loss"] for _ in range(steps)]
    compiled = trainer.compile
    trainer.close()
    return losses, compiled


def test_bf16_autocast_trains_close_to_fp32(tmp_path, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    fp32, _ = losses_of(trainer_overrides(tmp_path / "fp32", cache, "train.compile=false"))
    bf16, _ = losses_of(trainer_overrides(tmp_path / "bf16", cache, "train.compile=false", "train.precision=bf16"))
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert bf16 == pytest.approx(fp32, rel=2e-2)


def test_fp16_with_a_dynamic_loss_scale_skips_overflows_and_trains_on_cuda(tmp_path, stdlib_tokens):
    """fp16 autocast on CUDA (compiled, as auto chooses): at the default scale (2^16) it trains close to fp32;
    from 2^30 the first steps overflow and are skipped (the weights do not move, the skip is counted), the
    scale halves until the grads fit, and it trains from there."""
    from plait.train.trainer import Trainer

    cache = stdlib_tokens[0].parent.parent
    fp32, _ = losses_of(trainer_overrides(tmp_path / "fp32", cache))
    fp16, _ = losses_of(trainer_overrides(tmp_path / "fp16", cache, "train.precision=fp16"))
    assert fp16 == pytest.approx(fp32, rel=2e-2)
    trainer = Trainer(load_config(trainer_overrides(tmp_path / "high", cache, "train.steps=30", "train.precision=fp16",
                                                    "train.loss_scale_initial=1073741824",
                                                    "train.loss_scale_hysteresis=1")))
    records, untouched = [], []
    for _ in range(30):
        before = [p.detach().clone() for p in trainer.named_params.values()]
        records.append(trainer.step())
        untouched.append(all(torch.equal(b, p) for b, p in zip(before, trainer.named_params.values())))
    trainer.close()
    skips = [r["skipped_steps"] for r in records]
    assert untouched == [now > before for before, now in zip([0] + skips, skips)]  # a skip is a step not taken
    first = untouched.index(False)
    assert first > 0 and records[first]["loss_scale"] == 2.0 ** (30 - first)  # halved at each skip until it fit
    assert sum(untouched) < 30 - 10 and records[-1]["loss"] < records[first]["loss"]


def test_compile_auto_is_on_and_matches_eager(tmp_path, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    eager, compiled_eager = losses_of(trainer_overrides(tmp_path / "eager", cache, "train.compile=false"))
    compiled, compiled_on = losses_of(trainer_overrides(tmp_path / "compiled", cache))
    assert compiled_on and not compiled_eager
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_split_backward_on_cuda_equals_the_whole_one():
    """Zero-bubble's I then W on a CUDA chunk (fp32, the model's real layers): the input grad and the
    weight grads accumulated over three micro-batches equal the whole backward's. To 1e-6, not bitwise:
    CUDA's attention backward may pick a kernel that adds with atomics (on CPU the test is bitwise)."""
    import copy

    from plait.parallel.pipeline.split_backward import backward_input, backward_weight

    torch.manual_seed(0)
    split = cuda_model(seed=3)
    split.embed, split.norm, split.head = None, None, None  # a middle chunk: hidden states in and out
    whole = copy.deepcopy(split)
    pending = []
    for _ in range(3):
        x = torch.randn(2, 16, TINY.dim, device=CUDA, requires_grad=True)
        grad = torch.randn(2, 16, TINY.dim, device=CUDA)
        x_whole = x.detach().clone().requires_grad_()
        whole(x_whole).backward(grad)
        pending.append(backward_input(split(x), grad, [x], list(split.parameters())))
        torch.testing.assert_close(x.grad, x_whole.grad, rtol=1e-6, atol=1e-7)
        assert all(p.grad is None for p in split.parameters())  # no weight grad before W
    for item in pending:
        backward_weight(item)
    for (name, p), q in zip(split.named_parameters(), whole.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_split_backward_under_fsdp_on_cuda_equals_the_fused_one(tmp_path):
    """Zero-bubble under ZeRO-3 on CUDA (NCCL, a one-rank world): I's then W's, each W's grads reduce-scattered by
    hand (FSDP2's post-backward on its own stream, waited by its end-of-backward callback), against FSDP2's fused
    backward; W runs after I resharded the blocks, so it must not read the freed weights. To 1e-6 (atomics)."""
    import torch.distributed as dist

    from test_zero import split_against_fused

    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            device_id=CUDA)
    try:
        input_grads, weight_grads = split_against_fused(0, 1, "cuda", zero=3)
    finally:
        dist.destroy_process_group()
    for split, fused in input_grads:
        torch.testing.assert_close(torch.from_numpy(split), torch.from_numpy(fused), rtol=1e-6, atol=1e-7)
    for name, (split, fused) in weight_grads.items():
        torch.testing.assert_close(torch.from_numpy(split), torch.from_numpy(fused), rtol=1e-6, atol=1e-7, msg=name)
        assert abs(split).sum() > 0, name


def test_context_parallel_attention_math_on_cuda_under_bf16_autocast(tmp_path):
    """Ring and Ulysses attention on CUDA tensors in a one-rank group (no message, the blocks' math, the
    merge and the autocast guard): fp32 inside whatever autocast asks, equal to SDPA over the sequence."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from plait.parallel.context import ring_attention, ulysses_attention

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        generator = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(2, 4, 64, 16, device=CUDA, generator=generator, requires_grad=True) for _ in range(3))
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
        for attend in (lambda: ring_attention(q, k, v, scale=0.25, causal=True, group=None, ring=[0]),
                       lambda: ulysses_attention(q, k, v, scale=0.25, causal=True, group=None, cp=1)):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = attend()
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    finally:
        dist.destroy_process_group()


def overlapped_against_mapped(device: torch.device, sequence_parallel: bool, dtype):
    """(mapped, overlapped) results of a three-segment column layer in a one-rank group: the outputs, the input
    grad and the weight and bias grads, under autocast to `dtype` (None: none)."""
    from plait.parallel.column_overlap import OverlappedColumn
    from plait.parallel.tensor import MappedColumn

    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(4, 512, 256, device=device, generator=generator)
    weight = torch.randn(3 * 256, 256, device=device, generator=generator) / 16
    bias = torch.randn(3 * 256, device=device, generator=generator)
    grads = [torch.randn(4, 512, 256, device=device, generator=generator) for _ in range(3)]
    results = []
    for run in (MappedColumn(lambda t: t), OverlappedColumn(None, sequence_parallel)):
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            outs = run(*leaves, (256,) * 3)
        torch.autograd.backward(outs, [g.to(outs[0].dtype) for g in grads])
        results.append([torch.cat(outs, -1)] + [leaf.grad for leaf in leaves])
    return results


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["copy", "sequence-parallel"])
def test_overlapped_column_on_cuda_matches_the_mappings_path(tmp_path, sequence_parallel):
    """parallel.tp_overlap's column layer on CUDA (NCCL, a one-rank world): its collectives run on the
    communicator's stream and each wait orders the compute stream after them, so outputs and grads equal the
    mappings path's, in fp32 (to 1e-6) and under bf16 autocast (the same dtypes; to bf16's precision)."""
    import torch.distributed as dist

    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            device_id=CUDA)
    try:
        for dtype, tolerance in ((None, 1e-6), (torch.bfloat16, 2e-2)):
            mapped, overlapped = overlapped_against_mapped(CUDA, sequence_parallel, dtype)
            for name, expected, actual in zip(("out", "grad_x", "grad_w", "grad_b"), mapped, overlapped):
                assert actual.dtype == expected.dtype, (name, dtype)
                torch.testing.assert_close(actual.float(), expected.float(), rtol=tolerance, atol=tolerance,
                                           msg=f"{name} {dtype}")
    finally:
        dist.destroy_process_group()


def test_the_training_timeout_is_set_on_an_nccl_group(tmp_path):
    """parallel.train_timeout_s on NCCL: `set_group_timeout` reaches the NCCL backend of a one-rank world (torch's
    private setter, which a torch upgrade may move) and collectives still run after it."""
    import torch.distributed as dist

    from plait.common.compat import set_group_timeout

    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            device_id=CUDA)
    try:
        group = dist.new_group([0])
        for target in (None, group):
            set_group_timeout(target, 7)
        total = torch.ones(4, device=CUDA)
        dist.all_reduce(total, group=group)
        assert total.sum().item() == 4.0
        backend = group._get_backend(CUDA)
        assert backend.options._timeout.total_seconds() == 7.0
    finally:
        dist.destroy_process_group()


def test_zero3_on_one_gpu_equals_zero0_and_gathers_in_bf16(tmp_path, stdlib_tokens):
    """FSDP2 under plait on CUDA (NCCL, a one-rank world): fp32 zero=3 trains as zero=0; under bf16 it gathers
    bf16 weights, keeps fp32 master shards, and trains close to fp32."""
    import torch.distributed as dist

    from plait.launch.env import ProcessEnv
    from plait.train.reshard import ShardReader
    from plait.train.trainer import Trainer

    cache = stdlib_tokens[0].parent.parent
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            device_id=CUDA)
    try:
        def run(name, *extra):
            trainer = Trainer(load_config(trainer_overrides(tmp_path / name, cache, "train.compile=false", *extra)),
                              env=ProcessEnv(0, 0, 1, "torchrun"))
            losses = [trainer.step()["loss"] for _ in range(3)]
            dtypes = {p.dtype for p in trainer.named_params.values()}
            saved = None
            if trainer.fsdp:  # a checkpoint gathers each tensor on its writer (an NCCL gather) and holds them whole
                path = trainer.save_checkpoint()
                trainer.checkpointer.wait()
                reader = ShardReader(path)
                saved = all(torch.equal(reader.full_param(name), tensor.cpu())
                            for name, tensor in trainer.state(whole=True).named_params.items())
            trainer.close()
            return losses, trainer.fsdp, dtypes, saved

        zero0, fsdp0, _, _ = run("zero0")
        zero3, fsdp3, master, saved = run("zero3", "parallel.zero=3")
        bf16, _, master_bf16, _ = run("zero3-bf16", "parallel.zero=3", "train.precision=bf16")
    finally:
        dist.destroy_process_group()
    assert fsdp3 and not fsdp0 and saved
    assert zero3 == pytest.approx(zero0, rel=1e-4)
    assert master == master_bf16 == {torch.float32}
    assert bf16 == pytest.approx(zero0, rel=2e-2)


@torch.no_grad()
def test_cached_decoding_on_cuda_gives_the_full_forwards_logits_and_the_cpu_tokens():
    """`plait generate`'s KV cache with CUDA's SDPA kernels (a boolean mask, grouped-query heads), fp32 and bf16."""
    from plait.train.config import ModelConfig
    from plait.train.decode import attach_caches, generate

    cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=200, max_seq_len=40)
    cpu_model = build_model(cfg, seed=3).eval()
    model = build_model(cfg, seed=3, device=CUDA).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 14), generator=torch.Generator().manual_seed(3))
    full = cpu_model(ids)
    greedy = generate(model, ids.to(CUDA), 20, temperature=0).cpu()
    assert torch.equal(greedy, generate(cpu_model, ids, 20, temperature=0))
    attach_caches(model)
    cached = torch.cat([model(ids[:, :5].to(CUDA))] + [model(ids[:, i:i + 1].to(CUDA)) for i in range(5, 14)], dim=1)
    assert torch.allclose(cached.cpu(), full, atol=1e-4, rtol=1e-4), (cached.cpu() - full).abs().max()
    half = build_model(cfg, seed=3, device=CUDA).to(torch.bfloat16).eval()
    out = generate(half, ids.to(CUDA), 20, temperature=0.8, top_p=0.9, generator=torch.Generator(CUDA).manual_seed(0))
    assert out.shape == (2, 34) and bool((out < cfg.vocab_size).all())


@torch.no_grad()
def test_document_mask_on_cuda_keeps_each_document_to_itself_in_fp32_and_bf16():
    """`model.attn_mask=document` through CUDA's SDPA with a boolean mask (the memory-efficient kernel), fp32
    and under bf16 autocast, against the CPU model."""
    from plait.data.documents import document_ids
    from plait.train.config import ModelConfig

    cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=100, max_seq_len=64)
    cpu_model, model = build_model(cfg, seed=1).eval(), build_model(cfg, seed=1, device=CUDA).eval()
    generator = torch.Generator().manual_seed(0)
    documents = [torch.cat((torch.tensor([0]), torch.randint(1, 100, (n,), generator=generator))) for n in (9, 14, 6)]
    packed = torch.cat(documents)[None]
    reference = cpu_model(packed, documents=document_ids(packed, 0))
    out = model(packed.to(CUDA), documents=document_ids(packed.to(CUDA), 0)).cpu()
    assert torch.allclose(out, reference, atol=1e-4), (out - reference).abs().max()
    start = 0
    for document in documents:
        alone = model(document[None].to(CUDA))[0].cpu()
        assert torch.allclose(out[0, start:start + len(document)], alone, atol=1e-4)
        start += len(document)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = model(packed.to(CUDA), documents=document_ids(packed.to(CUDA), 0)).float().cpu()
    assert (half - reference).abs().max() < 0.05 * reference.abs().max()


def test_a_profile_on_cuda_holds_the_kernels_of_the_profiled_steps(tmp_path, stdlib_tokens):
    """`train.profile_steps` with the CUDA activity: the trace has the step's phases and GPU kernels under them."""
    import json

    from plait.train.trainer import Trainer

    cache = stdlib_tokens[0].parent.parent
    overrides = trainer_overrides(tmp_path, cache, "train.profile_steps=[2,3]", "train.compile=false")
    trainer = Trainer(load_config(overrides))
    trainer.fit()
    events = json.loads((tmp_path / "profile" / "rank-00000.json").read_text())["traceEvents"]
    names = [event.get("name") for event in events]
    assert names.count("plait.optimizer") == 2
    assert any(event.get("cat") == "kernel" for event in events)


@torch.no_grad()
def test_a_sliding_window_on_cuda_matches_the_cpu_and_decodes_through_the_cache():
    """`model.sliding_window` through CUDA's SDPA with a boolean mask, and `plait generate`'s windowed cache."""
    from plait.train.config import ModelConfig
    from plait.train.decode import generate

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, max_seq_len=64, sliding_window=5)
    cpu_model, model = build_model(cfg, seed=4).eval(), build_model(cfg, seed=4, device=CUDA).eval()
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    out = model(ids.to(CUDA)).cpu()
    assert torch.allclose(out, cpu_model(ids), atol=1e-4), (out - cpu_model(ids)).abs().max()
    greedy = generate(model, ids[:, :3].to(CUDA), 30, temperature=0).cpu()
    assert torch.equal(greedy, generate(cpu_model, ids[:, :3], 30, temperature=0))


def test_qk_norm_on_cuda_matches_the_cpu_in_fp32_and_trains_its_gains_under_bf16():
    """`model.qk_norm`: the per-head norms through CUDA's rms_norm (apex's where importable) on [b, s, h, d],
    the CPU's logits in fp32; under bf16 autocast the gains get finite, nonzero grads."""
    from plait.train.config import ModelConfig

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, max_seq_len=64, qk_norm=True)
    cpu_model, model = build_model(cfg, seed=4).eval(), build_model(cfg, seed=4, device=CUDA)
    ids = torch.randint(0, 100, (2, 25), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.eval()(ids[:, :-1].to(CUDA)).cpu()
    assert torch.allclose(out, cpu_model(ids[:, :-1]), atol=1e-4), (out - cpu_model(ids[:, :-1])).abs().max()
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(model(ids[:, :-1].to(CUDA)), ids[:, 1:].to(CUDA))
    loss.backward()
    for name, param in model.named_parameters():
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_loss_chunks_on_cuda_lower_the_peak_memory_and_keep_the_grads():
    """`train.loss_chunks` on CUDA under bf16 autocast: the same loss and grads as whole logits, and the peak
    memory of forward + backward lower by most of the fp32 logits and softmax (measured, max_memory_allocated)."""
    from plait.train.config import ModelConfig

    vocab, batch, seq = 32768, 4, 512
    model = build_model(ModelConfig(dim=256, n_layers=2, n_heads=8, vocab_size=vocab, max_seq_len=seq), seed=0,
                        device=CUDA)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0)).to(CUDA)
    results = {}
    for chunks in (0, 8):
        model.loss_chunks = chunks
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        torch.cuda.synchronize()
        results[chunks] = (float(loss), [p.grad.float().clone() for p in model.parameters()],
                           torch.cuda.max_memory_allocated() - start)
    assert results[8][0] == pytest.approx(results[0][0], rel=1e-3)
    for sliced, whole in zip(results[8][1], results[0][1]):
        assert torch.allclose(sliced, whole, rtol=2e-2, atol=1e-4)
    logits_fp32 = batch * seq * vocab * 4
    assert results[0][2] - results[8][2] > logits_fp32  # at least the fp32 logits' worth less at the peak


MOE_VARIANTS = {"mixtral": {}, "qwen-shared-capacity-z-bias": {"moe_shared_ffn_dim": 32, "moe_norm_topk": False,
                                                                "moe_capacity_factor": 0.75,
                                                                "moe_drop_policy": "position", "moe_z_loss": 0.01,
                                                                "moe_bias_update_rate": 0.01}}


@pytest.mark.parametrize("variant", list(MOE_VARIANTS))
def test_moe_on_cuda_matches_the_cpu_and_trains_compiled_and_under_bf16(variant, tmp_path, stdlib_tokens):
    """`model.moe_experts`: the routed experts on CUDA give the CPU's logits and grads in fp32; under bf16
    autocast every expert's weights get finite grads; and `train.compile=auto` (on for CUDA: the experts' row
    counts vary from step to step) trains with eager's losses. Also with a shared expert, unnormalized top-k, a
    capacity (dropping by position: the same pairs on both devices), the router z-loss and the routing bias (its
    loads counted inside the compiled block)."""
    from plait.train.config import ModelConfig

    options = MOE_VARIANTS[variant]
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=100, ffn_dim=96, max_seq_len=64, moe_experts=4,
                      **options)
    cpu_model, model = build_model(cfg, seed=4), build_model(cfg, seed=4, device=CUDA)
    ids = torch.randint(0, 100, (2, 25), generator=torch.Generator().manual_seed(0))
    for one, device in ((cpu_model, "cpu"), (model, CUDA)):
        one.loss(one(ids[:, :-1].to(device)), ids[:, 1:].to(device)).backward()
    for (name, ours), theirs in zip(model.named_parameters(), cpu_model.parameters()):
        torch.testing.assert_close(ours.grad.cpu(), theirs.grad, rtol=1e-4, atol=1e-6, msg=name)
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(model(ids[:, :-1].to(CUDA)), ids[:, 1:].to(CUDA))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    cache = stdlib_tokens[0].parent.parent
    moe = ["model.moe_experts=4", "model.moe_top_k=2", *(f"model.{key}={value}" for key, value in options.items())]
    eager, _ = losses_of(trainer_overrides(tmp_path / "eager", cache, "train.compile=false", *moe))
    compiled, compiled_on = losses_of(trainer_overrides(tmp_path / "compiled", cache, *moe))
    assert compiled_on and compiled == pytest.approx(eager, rel=1e-4)


def test_float8_on_cuda_equals_its_emulation_and_trains_close_to_bf16(tmp_path, stdlib_tokens):
    """`train.precision=fp8` on float8 tensor cores: `_scaled_mm` gives the CPU path's emulated GEMM (fast
    accumulation in the forward: a looser bound there); a mixture of experts (11 tokens over 8 experts: row counts
    padded to 16, some experts empty) gives the CPU's loss; and the trainer, eager and compiled (auto: on), trains
    within 2% of bf16. A GPU without float8 tensor cores is refused in one sentence instead."""
    from plait.parallel.float8 import FLOAT8_CAPABILITY, Float8Error, Float8Gemm, check_float8_device

    if torch.cuda.get_device_capability(CUDA) < FLOAT8_CAPABILITY:
        with pytest.raises(Float8Error, match="needs float8 tensor cores"):
            check_float8_device(CUDA)
        return
    gen = torch.Generator(device=CUDA).manual_seed(0)
    x = torch.randn(4, 64, 128, device=CUDA, generator=gen)
    weight = torch.randn(256, 128, device=CUDA, generator=gen) * 0.02
    grad = torch.randn(4, 64, 256, device=CUDA, generator=gen) * 1e-3
    results = []
    for device_type in ("cuda", "cpu"):  # the tensor-core GEMM, then the emulation (on the same CUDA tensors)
        xs, ws = x.clone().requires_grad_(), weight.clone().requires_grad_()
        y = Float8Gemm(device_type=device_type)(xs, ws)
        y.backward(grad)
        results.append((y.detach(), xs.grad, ws.grad))
    for name, ours, emulated, rtol in zip(("y", "x.grad", "weight.grad"), *results, (1e-2, 1e-4, 1e-4)):
        torch.testing.assert_close(ours, emulated, rtol=rtol, atol=rtol * emulated.abs().max().item(), msg=name)
    from plait.train.config import ModelConfig  # experts: rows padded to 16 on the tensor cores, some experts none

    moe = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=100, ffn_dim=96, max_seq_len=64, moe_experts=8,
                      moe_top_k=1, moe_shared_ffn_dim=32)
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for device in ("cpu", CUDA):
        model = build_model(moe, seed=4, device=device, float8=True)
        losses.append(model.loss(model(ids[:, :-1].to(device)), ids[:, 1:].to(device)))
        losses[-1].backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-3)
    cache = stdlib_tokens[0].parent.parent
    bf16, _ = losses_of(trainer_overrides(tmp_path / "bf16", cache, "train.compile=false", "train.precision=bf16"))
    fp8, _ = losses_of(trainer_overrides(tmp_path / "fp8", cache, "train.compile=false", "train.precision=fp8"))
    compiled, compiled_on = losses_of(trainer_overrides(tmp_path / "fp8c", cache, "train.precision=fp8"))
    assert compiled_on and fp8 != bf16
    assert fp8 == pytest.approx(bf16, rel=2e-2) and compiled == pytest.approx(fp8, rel=1e-2)


def test_multi_token_prediction_on_cuda_matches_the_cpu_and_trains_compiled_and_under_bf16(tmp_path, stdlib_tokens):
    """`model.mtp_layers=2`: the depths on CUDA give the CPU's MTP loss and every grad in fp32 (the counted
    positions found on the device); under bf16 autocast every depth's weights get finite grads; speculative decoding
    with the first depth gives greedy decoding's tokens on CUDA; and the trainer, eager and compiled (auto: on),
    trains with the same losses."""
    from plait.train.config import ModelConfig
    from plait.train.decode import generate
    from plait.train.mtp import future_tokens
    from plait.train.speculative import generate_with_mtp

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=100, ffn_dim=96, max_seq_len=64, mtp_layers=2)
    cpu_model, model = build_model(cfg, seed=4), build_model(cfg, seed=4, device=CUDA)
    ids = torch.randint(0, 100, (2, 25), generator=torch.Generator().manual_seed(0))
    for one, device in ((cpu_model, "cpu"), (model, CUDA)):
        tokens = ids.to(device)
        one.loss(one(tokens[:, :-1], future=future_tokens(tokens, 2)), tokens[:, 1:]).backward()
    assert model.mtp.totals[0].item() == pytest.approx(cpu_model.mtp.totals[0].item(), rel=1e-5)
    for (name, ours), theirs in zip(model.named_parameters(), cpu_model.parameters()):
        torch.testing.assert_close(ours.grad.cpu(), theirs.grad, rtol=1e-4, atol=1e-6, msg=name)
    model.zero_grad()
    tokens = ids.to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(model(tokens[:, :-1], future=future_tokens(tokens, 2)), tokens[:, 1:])
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n.startswith("mtp."))
    model.eval()
    prompt = tokens[:1, :6]
    drafted, stats = generate_with_mtp(model, prompt, 40)
    assert drafted.tolist() == generate(model, prompt, 40, temperature=0).tolist() and stats["drafted"] > 0
    cache = stdlib_tokens[0].parent.parent
    mtp = ["model.mtp_layers=2", "model.mtp_weight=0.3"]
    eager, _ = losses_of(trainer_overrides(tmp_path / "eager", cache, "train.compile=false", *mtp))
    compiled, compiled_on = losses_of(trainer_overrides(tmp_path / "compiled", cache, *mtp))
    assert compiled_on and compiled == pytest.approx(eager, rel=1e-4)


def test_latent_attention_on_cuda_matches_the_cpu_decodes_over_latents_and_trains_compiled_and_under_bf16(
        tmp_path, stdlib_tokens):
    """`model.attention=mla`: on CUDA the loss and every grad equal the CPU's in fp32 (the padded values through
    the fused kernels); under bf16 autocast every weight gets a finite grad; decoding over cached latents gives the
    logits of one uncached forward; and the trainer, eager and compiled (auto: on), trains with the same losses."""
    from plait.train.config import ModelConfig
    from plait.train.decode import caches_in

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=100, ffn_dim=96, max_seq_len=64, attention="mla",
                      q_lora_rank=32, kv_lora_rank=32)
    cpu_model, model = build_model(cfg, seed=4), build_model(cfg, seed=4, device=CUDA)
    ids = torch.randint(0, 100, (2, 25), generator=torch.Generator().manual_seed(0))
    losses = [one.loss(one(ids[:, :-1].to(device)), ids[:, 1:].to(device)) for one, device in
              ((cpu_model, "cpu"), (model, CUDA))]
    for loss in losses:
        loss.backward()
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)
    for (name, ours), theirs in zip(model.named_parameters(), cpu_model.parameters()):
        torch.testing.assert_close(ours.grad.cpu(), theirs.grad, rtol=1e-4, atol=1e-6, msg=name)
    model.zero_grad()
    tokens = ids.to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model.loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in model.parameters() if p.dim() == 2)
    model.eval()
    with torch.no_grad():
        whole = model(tokens)
        with caches_in(model.layers.values(), None):
            steps = [model(tokens[:, :10])] + [model(tokens[:, i:i + 1]) for i in range(10, 25)]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-4, atol=1e-5)
    cache = stdlib_tokens[0].parent.parent
    mla = ["model.attention=mla", "model.q_lora_rank=32"]
    eager, _ = losses_of(trainer_overrides(tmp_path / "eager", cache, "train.compile=false", *mla))
    compiled, compiled_on = losses_of(trainer_overrides(tmp_path / "compiled", cache, *mla))
    assert compiled_on and compiled == pytest.approx(eager, rel=1e-4)


def test_scaled_rotary_tables_made_on_cuda_equal_the_cpu_s():
    """Llama 3.1's and YaRN's rotary tables (YaRN's magnitude correction included) built on the device equal the
    CPU's, and a YaRN model's logits on CUDA equal the CPU's."""
    from plait.train.config import ModelConfig

    for scaling in (dict(rope_scaling="llama3", rope_original_max_len=32),
                    dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=16, rope_mscale=0.707,
                         rope_mscale_all_dim=1.0)):
        cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=100, ffn_dim=96, max_seq_len=64, **scaling)
        cpu_model, model = build_model(cfg, seed=4), build_model(cfg, seed=4, device=CUDA)
        torch.testing.assert_close(model.rope_cos.cpu(), cpu_model.rope_cos, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model.rope_sin.cpu(), cpu_model.rope_sin, rtol=1e-6, atol=1e-6)
        ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(model(ids.to(CUDA)).cpu(), cpu_model(ids), rtol=1e-4, atol=1e-5)
