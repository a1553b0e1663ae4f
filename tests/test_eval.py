"""`plait eval`: a checkpoint's held-out loss from any layout equals the `val_loss` its run logged."""

import json

import pytest
import torch

from dist_utils import run_ranks
from plait.train.config import load_config
from plait.train.tools import main as tools_main

SMALL = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=64", "train.seq_len=32",
         "train.batch_size=8", "train.progress=false", "train.peak_flops=1e10", "optim.warmup_steps=1",
         "train.steps=4", "train.eval_every=4", "train.eval_batches=3", "train.log_every=4"]


def _fit(rank, world, run_dir, cache, extra):
    from plait.launch.env import ProcessEnv
    from plait.train import Trainer

    cfg = load_config(SMALL + [f"train.run_dir={run_dir}", f"data.cache_dir={cache}", *extra])
    Trainer(cfg, env=ProcessEnv(rank, 0, world, "torchrun" if world > 1 else "single")).fit()


def logged_val_loss(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in records if "val_loss" in r][-1]


def plait_eval(capsys, *argv):
    """(exit status, the tool's line, stderr): the training above logs to the same stdout."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        tools_main(["eval", *argv])
    captured = capsys.readouterr()
    return exited.value.code, captured.out.strip().splitlines()[-1] if captured.out.strip() else "", captured.err


@pytest.mark.parametrize("world, extra", [(1, []), (1, ["model.attn_mask=document", "data.eos_id=10"]),
                                          (2, ["parallel.pp=2", "parallel.microbatches=2"])],
                         ids=["one-process", "documents", "pp2"])
def test_eval_gives_the_val_loss_the_run_logged(tmp_path, stdlib_tokens, capsys, world, extra):
    cache = stdlib_tokens[0].parent.parent
    run_ranks(world, _fit, tmp_path, cache, extra) if world > 1 else _fit(0, 1, tmp_path, cache, extra)
    code, out, err = plait_eval(capsys, str(tmp_path), "--json", str(tmp_path / "eval.json"))
    assert code == 0, err
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["loss"] == pytest.approx(logged_val_loss(tmp_path), rel=1e-5)
    assert result["step"] == 4 and result["batches"] == 3 and result["tokens"] == 3 * 8 * 32
    assert out.startswith(f"val_loss {result['loss']:.4f} | perplexity") and "bits/byte" in out


def test_eval_on_another_corpus_and_bad_input(tmp_path, stdlib_tokens, capsys):
    cache = stdlib_tokens[0].parent.parent
    _fit(0, 1, tmp_path / "run", cache, [])
    text = tmp_path / "other.txt"
    text.write_text("the same sentence, again and again. " * 400)
    code, out, err = plait_eval(capsys, str(tmp_path / "run"), "--data", str(text), "--batches", "2")
    assert code == 0, err
    assert f"tokens of {text}" in out and "2 batches" in out
    assert float(out.split()[1]) != pytest.approx(logged_val_loss(tmp_path / "run"), rel=1e-3)
    code, _, err = plait_eval(capsys, str(tmp_path / "run"), "--batches", "0")
    assert code == 2 and err.strip() == "plait eval: error: --batches 0 must be at least 1."
    code, _, err = plait_eval(capsys, str(tmp_path / "nowhere"))
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    code, _, err = plait_eval(capsys, str(tmp_path / "run"), "--seq-len", "4096")
    assert code == 2 and "--seq-len 4096 exceeds the model's max_seq_len=" in err, err
    hf = tmp_path / "hf"  # a directory whose config.json is not a model's: one line
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    code, _, err = plait_eval(capsys, str(hf))
    assert code == 2 and "cannot be read as a model's config" in err and len(err.strip().splitlines()) == 1, err


def test_eval_of_a_hugging_face_directory_is_transformers_loss_on_the_same_batches(tmp_path, capsys):
    """`plait eval HF_DIR --data TEXT`: the text tokenized by the directory's tokenizer.json, the mean cross-entropy
    transformers' own model gives on the same validation batches; without --data, one line says to pass it."""
    transformers = pytest.importorskip("transformers")
    from plait.data.config import DataConfig
    from plait.data.loader import Loader

    text = tmp_path / "text.txt"
    text.write_text("".join(f"def function_{i}(value):\n    return value * {i} + {i % 7}\n" for i in range(400)))
    prepared = Loader.from_config(DataConfig(path=str(text), tokenizer="bpe", vocab_size=300,
                                             cache_dir=str(tmp_path / "cache")), 16, 2, 1)
    prepared.close()
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)).eval()
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    (tmp_path / "hf" / "tokenizer.json").write_text(open(prepared.tokenizer).read())
    code, _, err = plait_eval(capsys, str(tmp_path / "hf"))
    assert code == 2 and "pass --data PATH" in err and len(err.strip().splitlines()) == 1, err
    code, out, err = plait_eval(capsys, str(tmp_path / "hf"), "--data", str(text), "--batches", "3", "--seq-len", "32",
                                "--batch-size", "4", "--device", "cpu", "--json", str(tmp_path / "eval.json"))
    assert code == 0, err
    data = DataConfig(path=str(text), tokenizer=str(tmp_path / "hf" / "tokenizer.json"),
                      cache_dir=str(tmp_path / "other-cache"))
    loader = Loader.from_config(data, 32, 4, 1, seed=1234, model_vocab=320)
    with torch.no_grad():  # (transformers shifts the labels itself: each of the 33 tokens but the first is a target)
        losses = [float(model(loader.val_batch(n)[0], labels=loader.val_batch(n)[0]).loss) for n in range(3)]
    loader.close()
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["loss"] == pytest.approx(sum(losses) / 3, rel=1e-5) and result["tokens"] == 3 * 4 * 32
