"""Multi-token prediction (train/mtp.py, `model.mtp_layers`): what it holds and how it is checked.

- `future_tokens` rows: each the targets shifted once more, past the end marked.
- One model's grads (main loss + weight x the MTP losses) equal those of the loss written out as DeepSeek-V3 states
  it, each depth on the sequence cut to the positions that have their token (no marker, no count), with the head
  whole or in slices, tied or not.
- The trainer under tp2 with SP, cp2 (ring and Ulysses), dp2 with ZeRO-3, a 4-rank tp2 x cp2, pipelines (1F1B,
  interleaved with ZeRO-1, ZB-H1, ZB-V, tp2 with ZeRO-2; the last stage holds a copy of the embedding), and with
  experts at ep2, a tied head in slices at tp2 with SP, or a tied head under pp2 (1F1B, ZB-V): its losses, grad
  norms, MTP losses and validation loss equal one process's.
- `plait plan`'s activation bytes match a real forward's.
- `model.mtp_weight=0` trains the same model as no MTP, bit for bit (and the validation loss is the next-token
  loss alone); a weight above 0 trains another.
- MFU's FLOPs count the depths' matmul weights, as the built model holds them; export leaves the depths out.
- A pipeline checkpoint holds the embedding alone and resumes exactly, at pp=2 and in one process.
- Speculative decoding (train/speculative.py) gives greedy decoding's tokens, drafts standing and falling; each
  cached guess is the depth's uncached prediction.
- Bad settings get one sentence.
"""

import dataclasses

import pytest
import torch

from tests.dist_utils import run_ranks
from tests.train_utils import logged_steps, make_trainer


def test_future_tokens_are_the_targets_shifted_once_more_each_row():
    from plait.train.mtp import PAST_END, future_tokens

    tokens = torch.arange(10, 16).view(1, 6)  # 5 positions
    rows = future_tokens(tokens, 2)[0]
    assert rows.tolist() == [[11, 12, 13, 14, 15], [12, 13, 14, 15, PAST_END], [13, 14, 15, PAST_END, PAST_END]]


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_both_loss_functions_weigh_each_tokens_loss_z_loss_included(z_loss):
    """`weights=` (the counted positions): the plain cross-entropy and the vocab-parallel one (one rank) give the
    weighted mean of each token's loss, its z-loss term included; all-ones weights give the unweighted loss."""
    from plait.parallel.grid import Grid
    from plait.parallel.plans import VocabParallelLoss
    from plait.train.model import cross_entropy

    gen = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(3, 5, 128, generator=gen), torch.randint(0, 100, (3, 5), generator=gen)
    weights = (torch.arange(15).view(3, 5) % 3 != 0).float()
    vocab_parallel = VocabParallelLoss(Grid.single(), 100)
    for loss_fn in (lambda *a, **k: cross_entropy(*a, vocab_size=100, **k), vocab_parallel):
        whole = loss_fn(logits, targets, z_loss=z_loss)
        assert loss_fn(logits, targets, z_loss=z_loss, weights=torch.ones(3, 5)).item() == pytest.approx(whole.item(),
                                                                                                         rel=1e-6)
        kept = weights.bool()
        expected = loss_fn(logits[kept], targets[kept], z_loss=z_loss) * kept.sum() / kept.numel()
        assert loss_fn(logits, targets, z_loss=z_loss, weights=weights).item() == pytest.approx(expected.item(),
                                                                                                 rel=1e-6)


def written_out_loss(model, tokens: torch.Tensor, weight: float) -> torch.Tensor:
    """The main loss plus weight x the mean over depths of each depth's cross-entropy, as DeepSeek-V3 writes it:
    depth k runs on the first s - k positions, embeds token i + k and predicts token i + k + 1."""
    ids, s = tokens[:, :-1], tokens.shape[1] - 1
    hidden = model.embedding(ids)
    for block in model.layers.values():
        hidden = block(hidden, model.rope_cos, model.rope_sin)
    total = torch.nn.functional.cross_entropy(model.logits(model.norm(hidden)).flatten(0, 1)[:, :model.vocab_size],
                                              tokens[:, 1:].flatten())
    depth_losses = []
    for k, layer in enumerate(model.mtp.layers, start=1):
        hidden, normed = layer(hidden[:, :s - k], model.embedding(tokens[:, k:s]), model.rope_cos, model.rope_sin,
                               None)
        logits = model.logits(normed)[..., :model.vocab_size]
        depth_losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, k + 1:].flatten()))
    return total + weight * torch.stack(depth_losses).mean(), torch.stack(depth_losses).mean()


@pytest.mark.parametrize("tied,chunks", [(False, 0), (True, 0), (False, 4)], ids=["untied", "tied", "head-in-slices"])
def test_grads_equal_the_written_out_loss(tied, chunks):
    from plait.train.build import build_model
    from plait.train.config import ModelConfig
    from plait.train.mtp import future_tokens

    cfg = ModelConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, tie_embeddings=tied,
                      mtp_layers=3, mtp_weight=0.3)
    tokens = torch.randint(0, 100, (3, 17), generator=torch.Generator().manual_seed(0))
    model, reference = build_model(cfg, seed=1), build_model(cfg, seed=1)
    model.loss_chunks = chunks
    model.loss(model(tokens[:, :-1], future=future_tokens(tokens, 3)), tokens[:, 1:]).backward()
    expected, mtp_mean = written_out_loss(reference, tokens, 0.3)
    expected.backward()
    sums, forwards = model.mtp.totals
    assert forwards == 1 and float(sums) == pytest.approx(float(mtp_mean), rel=1e-6)
    theirs = dict(reference.named_parameters())
    worst = max((float((p.grad - theirs[n].grad).norm() / theirs[n].grad.norm()), n)
                for n, p in model.named_parameters())
    assert worst[0] < 1e-5, worst
    assert model.mtp.layers[2].proj.weight.grad.norm() > 0  # the last depth trains


def test_eval_mode_and_no_future_leave_the_model_as_without_mtp():
    """In evaluation mode, or with no `future` given, the forward is the plain decoder's."""
    from dataclasses import replace

    from plait.train.build import build_model
    from plait.train.config import ModelConfig
    from plait.train.mtp import future_tokens

    cfg = ModelConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, mtp_layers=1)
    tokens = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    model, plain = build_model(cfg, seed=1), build_model(replace(cfg, mtp_layers=0), seed=1)
    expected = plain(tokens[:, :-1])
    assert torch.equal(model(tokens[:, :-1]), expected)
    model.eval()
    assert torch.equal(model(tokens[:, :-1], future=future_tokens(tokens, 1)), expected)
    assert model.mtp.totals[1] == 0  # no MTP loss was taken


# the trainer ----------------------------------------------------------------------------------
STEPS = 3


BASE = ["model.dim=32", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
        "model.vocab_size=256", "model.mtp_layers=2", "model.mtp_weight=0.3", "train.seq_len=32", "train.batch_size=8",
        f"train.steps={STEPS}", "train.eval_every=0", "train.eval_batches=2", "train.log_every=1",
        "train.progress=false", "train.peak_flops=1e10", "checkpoint.save_final=false", "parallel.microbatches=2"]


def train(rank, world, run_dir, cache, extra):
    trainer = make_trainer(rank, world, BASE, extra, run_dir, cache)
    return logged_steps(trainer, STEPS, ("loss", "grad_norm", "mtp_loss"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stdlib_tokens):
    cache = str(stdlib_tokens[0].parent.parent)
    return train(0, 1, str(tmp_path_factory.mktemp("mtp1")), cache, []), cache


@pytest.mark.parametrize("world,extra", [
    (2, ("parallel.tp=2", "parallel.sequence_parallel=true")),
    (2, ("parallel.cp=2",)),
    (2, ("parallel.cp=2", "parallel.cp_mode=ulysses")),
    (2, ("parallel.zero=3",)),
    (4, ("parallel.tp=2", "parallel.cp=2", "parallel.sequence_parallel=true")),
    (2, ("parallel.pp=2",)),
    (4, ("parallel.pp=2", "parallel.vpp=2", "parallel.zero=1")),
    (2, ("parallel.pp=2", "parallel.schedule=zbh1")),
    (2, ("parallel.pp=2", "parallel.schedule=zbv")),
    (4, ("parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero=2")),
], ids=["tp2-sp", "cp2-ring", "cp2-ulysses", "dp2-zero3", "tp2-cp2-sp", "pp2", "pp2-vpp2-dp2-zero1", "pp2-zbh1",
        "pp2-zbv", "pp2-tp2-sp-zero2"])
def test_trainer_layouts_equal_one_process(tmp_path, reference, world, extra):
    (expected, val), cache = reference
    for got, got_val in run_ranks(world, train, str(tmp_path / "run"), cache, list(extra)):
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-5), key
        assert got_val == pytest.approx(val, rel=1e-5)
    assert expected["mtp_loss"][-1] < expected["mtp_loss"][0]


@pytest.mark.parametrize("common,extra", [
    (["model.moe_experts=4", "model.moe_top_k=2", "model.moe_aux_loss=0"], ["parallel.ep=2"]),
    (["train.loss_chunks=2", "model.tie_embeddings=true"], ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    (["model.tie_embeddings=true"], ["parallel.pp=2"]),
    (["model.tie_embeddings=true"], ["parallel.pp=2", "parallel.schedule=zbv"]),
], ids=["moe-ep2", "tied-head-in-slices-tp2-sp", "tied-pp2", "tied-pp2-zbv"])
def test_with_experts_or_a_tied_head_layouts_equal_one_process(tmp_path, stdlib_tokens, common, extra):
    """A mixture of experts (each depth's block too) at ep2; a tied head run in slices at tp2 with SP; a tied head
    under a pipeline, where the last stage holds two copies of the embedding (the head's, the depths'), summed with
    it over the embedding group, or on one rank under ZB-V."""
    cache = str(stdlib_tokens[0].parent.parent)
    expected, val = train(0, 1, str(tmp_path / "one"), cache, common)
    for got, got_val in run_ranks(2, train, str(tmp_path / "two"), cache, common + extra):
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-5), key
        assert got_val == pytest.approx(val, rel=1e-5)


def resume_worker(rank, world, run_dir, cache):
    """pp=2: 2 steps and a checkpoint, then 2 more; the same 2 again from the checkpoint; with the last stage's copy
    of the embedding (equal to it bit for bit?) and the embedding, from each rank."""
    def run(*extra):
        return make_trainer(rank, world, BASE, ["parallel.pp=2", *extra], run_dir, cache)

    first = run()
    [first.step() for _ in range(2)]
    first.save_checkpoint()
    after = [first.step()["loss"] for _ in range(2)]
    weights = {name: first.named_params[name].detach().clone() for name in ("embed.weight", "mtp.embed.weight")
               if name in first.named_params}
    first.close()
    again = run("train.resume=auto")
    resumed = [again.step()["loss"] for _ in range(2)]
    again.close()
    return after, resumed, weights


def test_a_pipeline_checkpoint_holds_the_embedding_alone_and_resumes_exactly(tmp_path, reference):
    """pp=2 -> pp=2 resumes bit for bit, pp=2 -> one process to rel 1e-5; the checkpoint has no `mtp.embed.weight`
    (read from the embedding), and the copy ends equal to the embedding."""
    import json

    from plait.train.checkpoint import latest_checkpoint

    _, cache = reference
    results = run_ranks(2, resume_worker, str(tmp_path / "pp2"), cache)
    saved = latest_checkpoint(tmp_path / "pp2" / "checkpoints")
    index = json.loads((saved / "index.json").read_text())
    assert "mtp.embed.weight" not in index["params"] and "mtp.layers.0.proj.weight" in index["params"]
    one = train(0, 1, str(tmp_path / "one"), cache, [f"train.resume={saved}"])[0]["loss"]
    (after, resumed, first_stage), (after_last, resumed_last, last_stage) = results
    assert resumed == after and resumed_last == after_last  # pp=2 -> pp=2: exact
    assert one[:2] == pytest.approx(after, rel=1e-5)  # pp=2 -> one process
    assert torch.equal(first_stage["embed.weight"], last_stage["mtp.embed.weight"])


def test_weight_zero_trains_as_without_mtp_and_a_weight_trains_another_model(tmp_path, reference):
    (with_mtp, val_mtp), cache = reference
    runs = {}
    for tag, extra in (("off", ["model.mtp_layers=0"]), ("weight0", ["model.mtp_weight=0"])):
        runs[tag] = train(0, 1, str(tmp_path / tag), cache, extra)
    (off, val_off), (zero, val_zero) = runs["off"], runs["weight0"]
    assert zero["loss"] == off["loss"] and zero["grad_norm"] == off["grad_norm"] and val_zero == val_off
    assert with_mtp["loss"][0] == off["loss"][0]  # the logged loss is the next-token loss alone
    assert abs(with_mtp["loss"][-1] - off["loss"][-1]) > 1e-4 and val_mtp != val_off  # the MTP grads moved it


def test_flops_count_the_depths_matmul_weights():
    from dataclasses import replace

    from plait.train.build import build_model
    from plait.train.config import ModelConfig
    from plait.train.metrics import flops_per_token, matmul_params

    cfg = ModelConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, mtp_layers=2)
    model = build_model(cfg, seed=0)
    depths = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp.") and p.dim() == 2)
    head = 2 * 32 * 100  # each depth runs the head again
    assert matmul_params(cfg) - matmul_params(replace(cfg, mtp_layers=0)) == depths + head
    assert flops_per_token(cfg, 64) - flops_per_token(replace(cfg, mtp_layers=0), 64) == 6 * (depths + head) + \
        12 * 2 * 32 * 64


@pytest.mark.parametrize("depths", [1, 2])
def test_the_plans_activations_match_a_real_forward(depths):
    """`plait plan`'s activation bytes (one micro-batch alive at pp=1) against what a real CPU forward saves."""
    from plait.train.config import load_config
    from plait.train.model import Transformer
    from plait.train.mtp import future_tokens
    from plait.train.plan import plan
    from tests.memory_utils import saved_activation_bytes

    cfg = load_config(["model=tiny", "train.seq_len=64", "train.batch_size=8", "parallel.microbatches=2",
                       f"model.mtp_layers={depths}"])
    model = Transformer(cfg.model)
    ids = torch.randint(0, cfg.model.vocab_size, (4, 65))
    measured = saved_activation_bytes(model, lambda: model.loss(model(ids[:, :-1], future=future_tokens(ids, depths)),
                                                                ids[:, 1:]))
    without = saved_activation_bytes(model, lambda: model.loss(model(ids[:, :-1]), ids[:, 1:]))
    assert plan(cfg, 1).stages[0].activations == pytest.approx(measured, rel=0.10)
    assert measured > without * (1 + 0.25 * depths)  # the depths keep a layer's and more each


def test_export_leaves_the_depths_out():
    from plait.train.build import build_model
    from plait.train.config import ModelConfig, ffn_dim
    from plait.train.export import to_hf

    cfg = ModelConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mtp_layers=1)
    full = {name: param.detach() for name, param in build_model(cfg, seed=0).named_parameters()}
    plain = {name: tensor for name, tensor in full.items() if not name.startswith("mtp.")}
    model = {**dataclasses.asdict(cfg), "ffn_dim": ffn_dim(cfg)}
    exported = to_hf(model, full)
    assert exported.keys() == to_hf(model, plain).keys() and len(full) > len(plain)


@pytest.mark.parametrize("extra,words", [
    (["model.mtp_layers=-1"], "model.mtp_layers=-1 must be >= 0"),
    (["model.mtp_weight=-0.1"], "model.mtp_weight=-0.1 must be >= 0"),
])
def test_bad_settings_get_one_sentence(extra, words):
    from plait.train import load_config
    from plait.train.config import ConfigError, validate

    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        validate(load_config(["model.n_layers=4", *extra]), world_size=2)


# speculative decoding ----------------------------------------------------------------------------
def random_decoder(seed: int = 3):
    from plait.train.build import build_model
    from plait.train.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mtp_layers=1, max_seq_len=64,
                      sliding_window=24)
    return build_model(cfg, seed=seed).eval(), torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(1))


def right_then_wrong(greedy: torch.Tensor):
    """A drafter (around the first depth's, whose cache it keeps) that guesses right every other time, from greedy
    decoding's own text `greedy`, and wrong in between: drafts both stand and fall."""
    from plait.train.speculative import Drafter

    class Alternating(Drafter):
        calls = fed = 0

        def draft(self, hidden, following):
            super().draft(hidden, following)
            Alternating.calls += 1
            Alternating.fed += hidden.shape[1]
            right = greedy[0, min(Alternating.fed + 1, greedy.shape[1] - 1)].reshape(1)  # the token after next
            return right if Alternating.calls % 2 else (right + 1) % 64

    return Alternating


@pytest.mark.parametrize("new,eos", [(40, None), (200, None), (50, "drawn")], ids=["40", "to-max-seq-len", "eos"])
@pytest.mark.parametrize("drafter", ["first-depth", "right-then-wrong"])
def test_speculative_decoding_gives_greedy_decodings_tokens(new, eos, drafter):
    """Drafting with the first depth (or right and wrong in turn, so drafts both stand and fall) and
    checking two places per forward gives plain greedy decoding's tokens, to `model.max_seq_len` (past a sliding
    window) and to an end-of-document token; each forward adds one token plus one per draft that stood."""
    from plait.train.decode import generate
    from plait.train.speculative import Drafter, generate_with_mtp

    model, ids = random_decoder()
    if eos == "drawn":  # a token greedy decoding draws halfway
        eos = int(generate(model, ids, new, temperature=0)[0, ids.shape[1] + new // 2])
    plain = generate(model, ids, new, temperature=0, eos=eos)
    make = Drafter if drafter == "first-depth" else right_then_wrong(generate(model, ids, new, temperature=0))
    drafted, stats = generate_with_mtp(model, ids, new, eos=eos, make_drafter=make)
    assert drafted.tolist() == plain.tolist()
    assert stats["drafted"] < stats["forwards"]
    if drafter == "right-then-wrong":
        assert stats["accepted"] >= stats["drafted"] // 2 - 1 and stats["accepted"] < stats["drafted"]
    if eos is None:
        assert drafted.shape[1] - ids.shape[1] == stats["forwards"] + stats["accepted"]
    blocks = [*model.layers.values(), model.mtp.layers[0].block]
    assert all(block.attn.attend.__name__ != "attend" for block in blocks)  # the seams restored, the drafter's too


def test_each_draft_is_the_first_depths_prediction_without_a_cache():
    """Every guess the cached drafter makes equals the first MTP depth's greedy prediction at that place when the
    whole final sequence runs through the model and the depth at once, without caches."""
    from plait.train.attention_mask import AttentionMask
    from plait.train.speculative import Drafter, _greedy, generate_with_mtp

    model, ids = random_decoder(seed=5)
    guesses = []

    class Recording(Drafter):
        fed = 0

        def draft(self, hidden, following):
            Recording.fed += hidden.shape[1]
            guesses.append((Recording.fed - 1, int(super().draft(hidden, following))))  # guessed at that place
            return guesses[-1][1] * torch.ones(1, dtype=torch.long)

    sequence, stats = generate_with_mtp(model, ids, 50, make_drafter=Recording)
    window = AttentionMask.of(None, model.cfg.sliding_window)
    with torch.no_grad():
        hidden = model.trunk(sequence[:, :-1], window)
        layer = model.mtp.layers[0]
        _, normed = layer(hidden, model.embedding(sequence[:, 1:]), model.rope_cos, model.rope_sin, window)
        predicted = _greedy(model, normed)[0]
    assert len(guesses) == stats["drafted"] > 10
    assert [guess for _, guess in guesses] == [int(predicted[place]) for place, _ in guesses]


def test_speculative_decoding_of_a_model_without_depths_is_refused_in_one_sentence():
    """(`plait generate --speculative`'s refusals: test_generate.py.)"""
    from plait.train.build import build_model
    from plait.train.config import ModelConfig
    from plait.train.speculative import generate_with_mtp

    with pytest.raises(ValueError, match="has none \\(model.mtp_layers=0\\)"):
        generate_with_mtp(build_model(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4)).eval(),
                          torch.zeros(1, 3, dtype=torch.long), 5)
