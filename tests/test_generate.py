"""`plait generate`: cached decoding gives the full forward's logits, greedy decoding is the argmax of
full forwards, sampling follows the filtered distribution, and the tool reads what training saved."""

import json

import pytest
import torch

from plait.train.build import build_model
from plait.train.config import ModelConfig, load_config
from plait.train.decode import attach_caches, filter_logits, generate, next_tokens
from plait.train.model import Scales
from plait.train.tools import main as tools_main

CFG = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=200, max_seq_len=40)  # GQA, padded vocab
SCALES = Scales(2.0, 0.5, 1.0 / 16)  # muP's multipliers: the cache must keep the attention scale


def model_and_ids(seed=3, batch=2, length=14):
    model = build_model(CFG, seed=seed, scales=SCALES).eval()
    ids = torch.randint(0, CFG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    return model, ids


@torch.no_grad()
def test_cached_decoding_gives_the_full_forwards_logits():
    model, ids = model_and_ids()
    full = model(ids)
    attach_caches(model)
    pieces = [model(ids[:, :5]), model(ids[:, 5:8])]  # a prompt, then a chunk of three
    pieces += [model(ids[:, i:i + 1]) for i in range(8, ids.shape[1])]  # then one token at a time
    cached = torch.cat(pieces, dim=1)
    assert torch.allclose(cached, full, atol=1e-5, rtol=1e-5), (cached - full).abs().max()


@torch.no_grad()
def test_greedy_generation_is_the_argmax_of_full_forwards_and_restores_the_model():
    model, ids = model_and_ids()
    before = model(ids)
    reference = ids
    for _ in range(20):
        logits = model(reference)[:, -1, :CFG.vocab_size]
        reference = torch.cat((reference, logits.argmax(-1, keepdim=True)), dim=1)
    out = generate(model, ids, 20, temperature=0)
    assert torch.equal(out, reference)
    assert torch.equal(model(ids), before)  # the seams are the model's own again
    # at max_seq_len (40) it stops: 14 prompt tokens leave room for 26
    assert generate(model, ids, 100, temperature=0).shape == (2, 40)


@torch.no_grad()
def test_eos_ends_a_row_and_pads_it_and_generation_stops_when_every_row_has():
    model, ids = model_and_ids()
    greedy = generate(model, ids, 12, temperature=0)
    eos = int(greedy[0, ids.shape[1] + 2])  # row 0 draws it third
    out = generate(model, ids, 12, temperature=0, eos=eos)
    row0_end = ids.shape[1] + 3
    assert torch.equal(out[0, :row0_end], greedy[0, :row0_end]) and bool((out[0, row0_end:] == eos).all())
    drawn1 = greedy[1, ids.shape[1]:].tolist()
    row1_end = ids.shape[1] + (drawn1.index(eos) + 1 if eos in drawn1 else 12)
    assert out.shape[1] == max(row0_end, row1_end)
    assert torch.equal(out[1, :row1_end], greedy[1, :row1_end])


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.2, 0.1])
    logits = probs.log()
    kept = lambda out: set(torch.nonzero(out > float("-inf")).flatten().tolist())  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == {1, 3}
    assert kept(filter_logits(logits, top_p=0.7)) == {1, 3}  # 0.5 + 0.2 reaches 0.7
    assert kept(filter_logits(logits, top_p=0.71)) == {0, 1, 3}
    assert kept(filter_logits(logits, top_p=0.01)) == {1}  # the most likely always stays
    assert kept(filter_logits(logits, top_k=4, top_p=0.9)) == {0, 1, 3, 4}
    assert kept(filter_logits(logits)) == {0, 1, 2, 3, 4}
    kept_rows = filter_logits(torch.stack((logits, logits.roll(1))), top_p=0.7)  # per row, in each row's order
    assert kept(kept_rows[0]) == {1, 3} and kept(kept_rows[1]) == {2, 4}


def test_sampling_follows_the_tempered_filtered_distribution_and_is_seeded():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    rows = logits.expand(40000, -1)
    draws = next_tokens(rows, 0.5, 0, 0.9, torch.Generator().manual_seed(1))
    tempered = (logits / 0.5).softmax(-1)
    # top_p 0.9 keeps the tokens before which less than 0.9 of the mass lies
    keep = torch.zeros(5, dtype=torch.bool)
    ordered, order = tempered.sort(descending=True)
    keep[order[(ordered.cumsum(0) - ordered) < 0.9]] = True
    expected = torch.where(keep, tempered, torch.zeros(())) / tempered[keep].sum()
    frequency = torch.bincount(draws, minlength=5).float() / len(draws)
    assert (frequency - expected).abs().max() < 0.01, (frequency, expected)
    assert frequency[~keep].sum() == 0
    again = next_tokens(rows[:100], 0.5, 0, 0.9, torch.Generator().manual_seed(1))
    assert torch.equal(again, draws[:100])
    assert bool((next_tokens(rows[:50], 1.0, 1, 1.0, torch.Generator()) == 0).all())  # top_k 1 is greedy


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, stdlib_tokens):
    """A 4-step byte-level run on the standard library, its checkpoint and its in-memory model."""
    from plait.train.trainer import Trainer

    run = tmp_path_factory.mktemp("run")
    cache = stdlib_tokens[0].parent.parent
    cfg = load_config(["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=64",
                       "train.seq_len=32", "train.batch_size=4", "train.eval_every=0", "train.progress=false",
                       "train.peak_flops=1e10", "train.threads=1", "train.steps=4", f"train.run_dir={run}",
                       f"data.cache_dir={cache}", "model.max_seq_len=64"])
    trainer = Trainer(cfg)
    trainer.fit()
    model = trainer.chunks[0].eval()
    trainer.close()
    return run, model


def run_tool(capsys, *argv):
    with pytest.raises(SystemExit) as exited:
        tools_main(["generate", *argv])
    out = capsys.readouterr()
    return exited.value.code, out.out, out.err


def test_plait_generate_continues_a_prompt_with_the_checkpoints_model_and_tokenizer(trained_run, capsys):
    run, model = trained_run
    index = json.loads(next((run / "checkpoints").glob("step-*/index.json")).read_text())
    assert index["tokenizer"] == "byte"  # the trainer records what made its data
    prompt = "import os\n"
    ids = torch.tensor([list(prompt.encode())])
    expected = generate(model, ids, 30, temperature=0, eos=0)[0, ids.shape[1]:].tolist()
    expected = expected[:expected.index(0)] if 0 in expected else expected
    code, out, err = run_tool(capsys, str(run), "--prompt", prompt, "--max-new-tokens", "30", "--temperature", "0")
    assert code == 0, err
    assert out.split("-" * 40)[0] == (prompt.encode() + bytes(expected)).decode("utf-8", errors="replace") + "\n"
    assert "from step 4" in err
    code, first, _ = run_tool(capsys, str(run), "--samples", "3", "--seed", "5", "--max-new-tokens", "20")
    code, second, _ = run_tool(capsys, str(run), "--samples", "3", "--seed", "5", "--max-new-tokens", "20")
    assert code == 0 and first == second and len(set(first.split("-" * 40)[:3])) > 1  # seeded, rows differ


@pytest.mark.parametrize("argv, message", [
    (["--top-p", "0"], "--top-p 0.0 is outside (0, 1]; use 1 for no cut."),
    (["--temperature", "-1"], "--temperature -1.0 is negative"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0 must be at least 1."),
    (["--prompt", "x" * 64], "the prompt is 64 tokens but the model reads at most model.max_seq_len=64"),
    (["--tokenizer", "/nowhere/tokenizer.json"], "--tokenizer /nowhere/tokenizer.json: data.tokenizer="),
    (["--speculative"], "--speculative decodes one greedy continuation, but --temperature is 0.8"),
    (["--speculative", "--temperature", "0"], "this model has none (model.mtp_layers=0); drop --speculative."),
])
def test_bad_arguments_are_one_line_and_exit_2(trained_run, capsys, argv, message):
    run, _ = trained_run
    code, out, err = run_tool(capsys, str(run), *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out, err


def test_a_missing_checkpoint_or_an_unrecorded_tokenizer_is_named(trained_run, tmp_path, capsys):
    import shutil

    run, _ = trained_run
    code, _, err = run_tool(capsys, str(tmp_path / "nothing"))
    assert code == 2 and "does not exist; pass a checkpoint directory" in err
    copy = tmp_path / "old"
    shutil.copytree(run / "checkpoints", copy)
    for index_file in copy.glob("step-*/index.json"):  # as saved before plait recorded the tokenizer
        index = json.loads(index_file.read_text())
        index.pop("tokenizer")
        index_file.write_text(json.dumps(index))
    code, _, err = run_tool(capsys, str(copy))
    assert code == 2 and "pass --tokenizer byte or --tokenizer path/to/tokenizer.json" in err
    code, _, err = run_tool(capsys, str(copy), "--tokenizer", "byte", "--max-new-tokens", "3")
    assert code == 0, err


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_plait_generate_reads_a_hugging_face_directory_and_decodes_as_transformers(family, tmp_path, capsys):
    """`plait generate DIR` on a Hugging Face directory: its config read into a plait model (Llama 3.1's rope scaling,
    Qwen2's biases), the greedy tokens transformers' own generate gives; what plait does not compute is one line."""
    transformers = pytest.importorskip("transformers")
    shape = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if family == "llama3":
        config = transformers.LlamaConfig(**shape, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
        model = transformers.LlamaForCausalLM(config)
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, rope_theta=1e6))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.eval().save_pretrained(tmp_path / "hf", safe_serialization=True)
    prompt = "def f(x):"
    ids = torch.tensor([list(prompt.encode())])
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0,
                                  eos_token_id=None, attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()
    expected = expected[:expected.index(0)] if 0 in expected else expected
    code, out, err = run_tool(capsys, str(tmp_path / "hf"), "--prompt", prompt, "--max-new-tokens", "20",
                              "--temperature", "0", "--tokenizer", "byte", "--device", "cpu")
    assert code == 0, err
    text = (prompt.encode() + bytes(min(i, 0xFF) for i in expected)).decode("utf-8", errors="replace")
    assert out.split("-" * 40)[0] == text + "\n"  # (ids past the bytes print as U+FFFD)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    code, out, err = run_tool(capsys, str(tmp_path / "hf"), "--tokenizer", "byte")
    assert code == 2 and "hidden_act=gelu" in err and len(err.strip().splitlines()) == 1, err


def test_a_bpe_corpus_records_its_tokenizer_json_which_decodes_what_it_encodes(tmp_path):
    from plait.data.config import DataConfig
    from plait.data.loader import Loader
    from plait.train.decode import load_tokenizer

    text = tmp_path / "text"
    text.mkdir()
    body = "".join(f"def function_{i}(value):\n    return value * {i} + math.pi  # café\n" for i in range(300))
    (text / "a.py").write_text(body)
    cfg = DataConfig(path=str(text), tokenizer="bpe", vocab_size=300, cache_dir=str(tmp_path / "cache"),
                     val_fraction=0.1)
    loader = Loader.from_config(cfg, 16, 2, 1)
    loader.close()
    assert loader.tokenizer.endswith("tokenizer.json")
    tokenizer = load_tokenizer(None, {"tokenizer": loader.tokenizer, "model": {"vocab_size": 300}})
    sample = "def function_7(value):\n    return value * 7  # café\n"
    assert tokenizer.decode(tokenizer.encode(sample)) == sample
    with pytest.raises(Exception, match="has 300 tokens but the model 256"):
        load_tokenizer(None, {"tokenizer": loader.tokenizer, "model": {"vocab_size": 256}})
