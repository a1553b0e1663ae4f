"""The decoder's shapes, causal masking, GQA, tied embeddings and layout-independent init."""

import torch
import torch.nn.functional as F

from plait.train.config import ModelConfig
from plait.parallel.plans import padded_vocab
from plait.train.build import build_model
from plait.train.model import apply_rotary, choose_attention

SMALL = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=256, max_seq_len=64)


def test_logits_shape_and_parameter_count():
    model = build_model(SMALL, seed=0)
    tokens = torch.randint(0, 256, (3, 17))
    assert model(tokens).shape == (3, 17, padded_vocab(256, 1))
    # embed + head: 2 x 256 x 64; per layer: qkv 64x192, o 64x64, w13 64x2x192, w2 192x64, 2 norms; final norm
    expected = 2 * 256 * 64 + 2 * (64 * 192 + 64 * 64 + 64 * 384 + 192 * 64 + 2 * 64) + 64
    assert sum(p.numel() for p in model.parameters()) == expected


def test_causal_masking_future_tokens_do_not_change_past_logits():
    model = build_model(SMALL, seed=1)
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_grouped_query_attention_matches_repeated_kv_heads():
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=32)
    model = build_model(cfg, seed=2)
    attn = model.layers["0"].attn
    x = torch.randn(2, 8, 64)
    q, k, v = F.linear(x, attn.wqkv.weight).split([64, 32, 32], dim=-1)
    q = q.view(2, 8, 4, 16).transpose(1, 2)
    k = k.view(2, 8, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
    v = v.view(2, 8, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
    frequencies = 1.0 / (cfg.rope_theta ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))  # by hand
    angles = torch.outer(torch.arange(32, dtype=torch.float32), frequencies)
    cos, sin = angles.cos(), angles.sin()
    q, k = apply_rotary(q, cos[:8], sin[:8]), apply_rotary(k, cos[:8], sin[:8])
    scores = (q @ k.transpose(-1, -2)) / 4.0
    scores = scores.masked_fill(torch.triu(torch.ones(8, 8, dtype=torch.bool), 1), float("-inf"))
    reference = F.linear((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 8, 64), attn.wo.weight)
    torch.testing.assert_close(attn(x, model.rope_cos, model.rope_sin), reference, rtol=1e-5, atol=1e-6)


def test_tied_embeddings_share_one_matrix():
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=256, tie_embeddings=True)
    model = build_model(cfg, seed=0)
    assert model.head is None
    tokens = torch.randint(0, 256, (2, 9))
    model.loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    assert model.embed.weight.grad is not None and sum(p.numel() for p in model.parameters()) == 256 * 64 + \
        (64 * 192 + 64 * 64 + 64 * 384 + 192 * 64 + 128) + 64


def test_init_depends_only_on_seed_and_name():
    a, b, c = build_model(SMALL, seed=5), build_model(SMALL, seed=5), build_model(SMALL, seed=6)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.ndim == 2:
            assert not torch.equal(pa, pc), name
    # residual output projections are scaled by 1/sqrt(2 n_layers)
    std_o = a.layers["0"].attn.wo.weight.std().item()
    assert abs(std_o - 0.02 / 2.0) < 0.002


def test_loss_is_cross_entropy_in_nats():
    model = build_model(SMALL, seed=3)
    tokens = torch.randint(0, 256, (2, 12))
    logits = model(tokens[:, :-1])
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1])[:, :256], tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(model.loss(logits, tokens[:, 1:]), expected)


def test_cpu_attention_runs_in_fp32_under_bf16_autocast():
    """On CPU the attention kernel attends in fp32 (torch's bf16 CPU kernel is slower) and returns bf16."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8).bfloat16() for _ in range(3))
    attend = choose_attention(torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, 8 ** -0.5, False)
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).bfloat16()
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_kernel = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.equal(bf16_kernel, reference)  # the choice changes the numbers, so this test can fail


def test_forward_segments_match_the_fused_output_and_its_grads():
    """One GEMM per fused segment gives the split fused output and the same weight and input grads."""
    from plait.parallel.grid import Grid
    from plait.parallel.tensor import ColumnParallelLinear

    torch.manual_seed(0)
    layer = ColumnParallelLinear(16, 40, Grid.single(), segments=(24, 8, 8), bias=True)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(3, 5, 16, requires_grad=True)
    parts = layer.forward_segments(x)
    fused = layer(x).split([24, 8, 8], dim=-1)
    assert [p.shape[-1] for p in parts] == [24, 8, 8]
    for part, expected in zip(parts, fused):
        torch.testing.assert_close(part, expected, rtol=1e-6, atol=1e-6)
    weights = [torch.randn_like(p) for p in parts]
    grads_segments = torch.autograd.grad(sum((p * w).sum() for p, w in zip(parts, weights)),
                                         (x, layer.weight, layer.bias))
    grads_fused = torch.autograd.grad(sum((p * w).sum() for p, w in zip(fused, weights)),
                                      (x, layer.weight, layer.bias))
    for got, expected in zip(grads_segments, grads_fused):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
