"""The data layer: shards (plait's and Megatron's), preparation, sampling, the loader and the unified tensor."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from plait.data.config import DataConfig
from plait.data.dataset import OpenShard, TokenDataset, TokenSpan
from plait.data.errors import DataError
from plait.data.loader import Loader
from plait.data.prepare import main as prepare_main, prepare
from plait.data.sampler import BLOCK, Sampler, permute
from plait.data.shards import MAGIC, ShardWriter, TokenShard
from plait.data.sources import open_sources
from plait.data.unified import UnifiedTensor

CPU = torch.device("cpu")


def write_corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "plait", "token", "shard", "\n"]
    for i in range(12):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, 300 + 40 * i)))
    (root / "records.jsonl").write_text("".join(json.dumps({"text": f"record {i} " * (20 + i)}) + "\n" for i in range(30)))
    (root / "image.bin").write_bytes(b"\x00\x01\x02" * 100)  # binary: skipped
    return root


def write_megatron(prefix: Path, docs, dtype=np.int32, code=4) -> None:
    """A Megatron indexed dataset written from the format's description (independently of plait's writer);
    the index describes `code`'s token size, the .bin holds `dtype` (they differ to make a mismatch)."""
    lengths = np.array([len(d) for d in docs], np.int32)
    item = {4: 4, 8: 2}[code]
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1]) * item]).astype(np.int64)
    with open(f"{prefix}.idx", "wb") as f:
        f.write(MAGIC + struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(docs)) + struct.pack("<Q", len(docs) + 1))
        f.write(lengths.tobytes() + pointers.tobytes() + np.arange(len(docs) + 1, dtype=np.int64).tobytes())
    np.concatenate(docs).astype(dtype).tofile(f"{prefix}.bin")


def test_prepare_is_exact_deterministic_and_parallel(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    one = prepare([str(corpus)], tmp_path / "w1", val_fraction=0.2, workers=1, progress=False)
    two = prepare([str(corpus)], tmp_path / "w2", val_fraction=0.2, workers=2, progress=False)
    assert one == two and one["dtype"] == "uint16" and one["vocab_size"] == 256
    for name in ("train.bin", "train.idx", "val.bin", "val.idx"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    # every document comes back byte for byte, followed by EOS, and the .idx marks its start
    texts = [(corpus / f"doc{i:02d}.txt").read_bytes() for i in range(12)]
    texts += [f"record {i} ".encode() * (20 + i) for i in range(30)]
    docs = []
    for split in ("train", "val"):
        shard = TokenShard(tmp_path / "w1" / split)
        bounds = list(shard.doc_starts()) + [len(shard)]
        docs += [bytes(shard.tokens[a:b - 1].astype(np.uint8)) for a, b in zip(bounds[:-1], bounds[1:])]
        assert all(shard.tokens[b - 1] == 0 for b in bounds[1:])
    assert sorted(docs) == sorted(texts)
    assert one["train_documents"] + one["val_documents"] == 42 and one["val_documents"] > 0


def test_bpe_trained_on_corpus_round_trips_and_vocab_is_checked(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    meta = prepare([str(corpus)], tmp_path / "bpe", tokenizer="bpe", vocab_size=300, progress=False)
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 300 and meta["dtype"] == "uint16"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "bpe" / "tokenizer.json"))
    shard = TokenShard(tmp_path / "bpe" / "train")
    first = shard.tokens[:shard.doc_starts()[1] - 1].tolist()
    assert tok.decode(first) == (corpus / "doc00.txt").read_text()
    assert len(first) < len((corpus / "doc00.txt").read_bytes())  # merges happened
    # the loaded tokenizer.json gives the same shards
    again = prepare([str(corpus)], tmp_path / "bpe2", tokenizer=str(tmp_path / "bpe" / "tokenizer.json"), progress=False)
    assert again["train_tokens"] == meta["train_tokens"]
    assert (tmp_path / "bpe" / "train.bin").read_bytes() == (tmp_path / "bpe2" / "train.bin").read_bytes()
    with pytest.raises(DataError, match="model.vocab_size=256"):
        open_sources(DataConfig(path=str(tmp_path / "bpe")), 16, CPU, model_vocab=256)
    with pytest.raises(DataError, match="does not fit uint8"):
        prepare([str(corpus)], tmp_path / "u8", tokenizer="bpe", vocab_size=300, dtype="uint8", progress=False)


def test_megatron_shards_load_and_bad_files_name_themselves(tmp_path):
    docs = [np.arange(100) + 70000, np.arange(57) + 5, np.arange(300)]
    write_megatron(tmp_path / "mega", docs)
    shard = TokenShard(tmp_path / "mega.bin")
    assert shard.dtype == np.int32 and list(shard.doc_starts()) == [0, 100, 157]
    assert np.array_equal(shard.tokens, np.concatenate(docs))
    loader = Loader(tmp_path / "mega", None, 8, 4, 1)
    rows = loader.batch(0)[0]
    assert rows.dtype == torch.int64 and rows.max() < 70100
    # uint16 written as int32 (a dtype mismatch), truncation, corruption
    write_megatron(tmp_path / "mismatch", docs, dtype=np.int32, code=8)
    with pytest.raises(DataError, match=r"mismatch\.bin.*dtype mismatch"):
        TokenShard(tmp_path / "mismatch")
    bin_bytes = (tmp_path / "mega.bin").read_bytes()
    (tmp_path / "mega.bin").write_bytes(bin_bytes[:-10])
    with pytest.raises(DataError, match=r"mega\.bin holds .* truncated"):
        TokenShard(tmp_path / "mega")
    (tmp_path / "mega.bin").write_bytes(bin_bytes)
    idx_bytes = (tmp_path / "mega.idx").read_bytes()
    (tmp_path / "mega.idx").write_bytes(idx_bytes[:-8])
    with pytest.raises(DataError, match=r"mega\.idx holds .* truncated"):
        TokenShard(tmp_path / "mega")
    (tmp_path / "mega.idx").write_bytes(b"NOTANIDX!" + idx_bytes[9:])
    with pytest.raises(DataError, match=r"mega\.idx is not a Megatron"):
        TokenShard(tmp_path / "mega")
    with pytest.raises(DataError, match=r"nothere\.idx does not exist"):
        TokenShard(tmp_path / "nothere")
    # metadata claiming a vocabulary too large for the shards' dtype
    prepare([str(write_corpus(tmp_path / "c"))], tmp_path / "p", progress=False)
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    (tmp_path / "p" / "meta.json").write_text(json.dumps({**meta, "vocab_size": 70000}))
    with pytest.raises(DataError, match=r"train\.bin: vocabulary of 70000 .* uint16"):
        open_sources(DataConfig(path=str(tmp_path / "p")), 16, CPU)


def test_missing_and_empty_paths_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(DataError, match="does not exist"):
        open_sources(DataConfig(path=str(tmp_path / "missing")), 16, CPU)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no non-empty text files"):
        open_sources(DataConfig(path=str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache")), 16, CPU)
    assert prepare_main([str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert not (tmp_path / "o").exists()


def test_permutation_is_a_bijection_for_any_size_and_costs_o_batch():
    for n in (2, 3, 17, 1000, 4097):
        assert sorted(permute(np.arange(n), n, 7).tolist()) == list(range(n))
    assert not np.array_equal(permute(np.arange(1000), 1000, 7), permute(np.arange(1000), 1000, 8))
    huge = Sampler([10 ** 12], [1.0], seed=3)  # a trillion samples: nothing of that size is built
    _, ids = huge(np.arange(10 ** 9, 10 ** 9 + 64))
    assert len(set(ids.tolist())) == 64 and ids.min() >= 0 and ids.max() < 10 ** 12


def test_blend_proportions_within_one_percent_and_epochs_cover_every_sample():
    weights = [0.5, 0.3, 0.15, 0.05]
    sampler = Sampler([997, 5000, 300, 20000], weights, seed=1)
    dataset, ids = sampler(np.arange(10_000))
    share = np.bincount(dataset, minlength=4) / 10_000
    assert np.abs(share - weights).max() < 0.01
    assert np.abs(share - weights).max() <= 1 / BLOCK  # whole blocks are exact
    # dataset 2 (300 samples, 150 slots a block) runs one epoch per 2 blocks: each reads every sample once
    small = ids[dataset == 2]
    for epoch in range(5):
        assert sorted(small[epoch * 300:(epoch + 1) * 300].tolist()) == list(range(300))
    with pytest.raises(DataError, match="under 1/1000"):
        Sampler([10, 10], [1.0, 1e-5], seed=0)


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(5)
    for name, vocab in (("a", 256), ("b", 60000)):
        writer = ShardWriter(root / name, np.uint16)
        for _ in range(20):
            writer.add(rng.integers(1 if name == "a" else 256, vocab, size=int(rng.integers(50, 400))))
        writer.close()
    return root


def test_batches_equal_numpy_slices_and_are_pure_functions_of_seed_and_step(two_shards):
    seq_len, batch, m = 16, 8, 2
    loader = Loader(two_shards / "b", None, seq_len, batch, m, seed=11)
    tokens = np.fromfile(two_shards / "b.bin", dtype=np.uint16)
    sampler = Sampler([(len(tokens) - 1) // seq_len], [1.0], seed=11)
    for step in (0, 1, 57, 5000):
        _, ids = sampler(np.arange(step * batch, (step + 1) * batch))
        reference = np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in ids]).astype(np.int64)
        got = loader.batch(step)
        assert got.shape == (m, batch // m, seq_len + 1) and got.dtype == torch.int64
        assert np.array_equal(got.reshape(batch, -1).numpy(), reference)
        assert got.max() >= 256  # uint16 ids above int16's range survive the signed gather
    straddling = Loader(two_shards / "b", None, seq_len, 12, 3, seed=11).batch(682)  # positions 8184..8195
    _, ids = sampler(np.arange(682 * 12, 683 * 12))
    reference = np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in ids]).astype(np.int64)
    assert np.array_equal(straddling.reshape(12, -1).numpy(), reference)
    again = Loader(two_shards / "b", None, seq_len, batch, m, seed=11)
    assert torch.equal(again.batch(57), loader.batch(57))
    assert not torch.equal(Loader(two_shards / "b", None, seq_len, batch, m, seed=12).batch(57), loader.batch(57))


def test_resume_and_dp_ranks(two_shards):
    args = ([two_shards / "a", two_shards / "b"], [two_shards / "a"], 16, 12, 3)
    full = Loader(*args, seed=4, weights=[0.25, 0.75])
    uninterrupted = [full.next() for _ in range(10)]
    first = Loader(*args, seed=4, weights=[0.25, 0.75])
    for _ in range(6):
        first.next()
    state = json.loads(json.dumps(first.state()))  # a few ints, through JSON as a checkpoint stores them
    assert set(state) == {"seed", "step", "batch_size", "rampup"} and state["step"] == 6 and state["rampup"] is None
    resumed = Loader(*args, seed=999, weights=[0.25, 0.75])
    resumed.load_state(state)
    assert all(torch.equal(resumed.next(), uninterrupted[k]) for k in range(6, 10))
    with pytest.raises(DataError, match="train.batch_size=12"):
        Loader(args[0], None, 16, 24, 3).load_state(state)
    # dp=2: the ranks' slices make up the dp=1 batch, in order, with no window shared within the step
    ranks = [Loader(*args[:3], 12, 3, dp_rank=r, dp_size=2, seed=4, weights=[0.25, 0.75]) for r in range(2)]
    for step in (0, 3, 9):
        parts = [r.batch(step).reshape(6, -1) for r in ranks]
        assert torch.equal(torch.cat(parts), uninterrupted[step].reshape(12, -1))
        rows = {tuple(row.tolist()) for row in torch.cat(parts)}
        assert len(rows) == 12
    assert torch.equal(ranks[1].val_batch(2), ranks[1].val_batch(2)) and ranks[1].val_batch(2).shape == (3, 2, 17)


def test_blend_through_the_loader_follows_weights(two_shards):
    loader = Loader([two_shards / "a", two_shards / "b"], None, 8, 100, 1, seed=0, weights=[0.3, 0.7])
    rows = torch.cat([loader.batch(s)[0] for s in range(100)])  # 10,000 samples
    from_b = (rows.max(dim=1).values >= 256).float().mean().item()  # shard a's ids are all < 256
    assert abs(from_b - 0.7) < 0.01


def test_unified_tensor_on_cpu_matches_indexing_and_closes():
    array = np.arange(40, dtype=np.int16).reshape(10, 4)
    with UnifiedTensor(array, CPU) as unified:
        assert unified.mode == "host"
        index = torch.tensor([3, 0, 9, 3])
        assert torch.equal(unified.gather(index), torch.from_numpy(array)[index])
        windows = UnifiedTensor(np.arange(20, dtype=np.int32), CPU).strided((4, 5), (4, 1), 1)
        assert torch.equal(windows[torch.tensor([[2], [0]])].reshape(2, 5),
                           torch.tensor([[9, 10, 11, 12, 13], [1, 2, 3, 4, 5]], dtype=torch.int32))
    assert unified.closed


@pytest.mark.gpu
def test_unified_tensor_gathers_on_the_gpu_from_registered_host_memory(two_shards):
    device = torch.device("cuda")
    shard = OpenShard(TokenShard(two_shards / "b"), device)
    assert shard.unified.mode == "unified" and shard.unified.view.is_cuda
    dataset = TokenDataset([TokenSpan(shard, 0, len(shard.shard))], 16)
    cpu = TokenDataset([TokenSpan(OpenShard(TokenShard(two_shards / "b"), CPU), 0, len(shard.shard))], 16)
    ids = np.array([5, 1, 77, 3])
    got = dataset.gather(ids)
    assert got.is_cuda and torch.equal(got.cpu(), cpu.gather(ids))
    staged = UnifiedTensor(shard.shard.tokens.view(np.int16), device, mode="staged")
    assert torch.equal(staged.gather(torch.tensor([7, 8])).cpu(), shard.unified.host[[7, 8]])
    shard.close()
    assert shard.unified.closed


def test_default_corpus_is_the_byte_level_stdlib_with_a_held_out_split(stdlib_tokens):
    train_bin, val_bin = stdlib_tokens
    cache = str(train_bin.parent.parent)
    meta = json.loads((train_bin.parent / "meta.json").read_text())
    assert meta["tokenizer"] == "byte" and meta["dtype"] == "uint16" and meta["val_tokens"] > 10_000
    assert meta["train_tokens"] == len(TokenShard(train_bin)) and meta["val_documents"] > 0
    loader = Loader.from_config(DataConfig(cache_dir=cache), 64, 4, 2, seed=0, model_vocab=256)
    assert loader.batch(0).shape == (2, 2, 65) and int(loader.batch(3).max()) < 256
    val_tokens = np.fromfile(val_bin, dtype=np.uint16)
    row = loader.val_batch(0)[0, 0].numpy()
    starts = np.flatnonzero(val_tokens[:len(val_tokens) - 64] == row[0])
    assert any(np.array_equal(val_tokens[s:s + 65], row) for s in starts)  # validation reads the held-out file
    loader.close()


def test_prepared_without_validation_and_megatron_directory_hold_out_a_tail(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    prepare([str(corpus)], tmp_path / "noval", val_fraction=0.0, progress=False)
    sources, _ = open_sources(DataConfig(path=str(tmp_path / "noval")), 16, CPU)
    assert sources[0].val is None and len(sources[0].train) > 0
    (tmp_path / "mega").mkdir()
    for k in range(2):
        write_megatron(tmp_path / "mega" / f"part{k}", [np.arange(1000) + 1000 * k])
    sources, _ = open_sources(DataConfig(path=str(tmp_path / "mega"), val_fraction=0.1), 16, CPU)
    train, val = sources[0].train, sources[0].val
    assert [(s.start, s.end) for s in train.spans] == [(0, 900), (0, 900)]
    assert [(s.start, s.end) for s in val.spans] == [(900, 1000), (900, 1000)]
    rows = train.gather(np.arange(len(train)))
    assert len(train) == 2 * (899 // 16) and int(rows.max()) < 1900 and int(rows[-1, 0]) >= 1000


def test_a_single_document_is_split_at_its_tail(tmp_path):
    text = "".join(f"line {i}\n" for i in range(2000)).encode()
    (tmp_path / "one.txt").write_bytes(text)
    meta = prepare([str(tmp_path / "one.txt")], tmp_path / "out", val_fraction=0.1, progress=False)
    train, val = TokenShard(tmp_path / "out" / "train"), TokenShard(tmp_path / "out" / "val")
    assert meta["val_tokens"] == len(val) == len(text) + 1 - int((len(text) + 1) * 0.9)
    joined = np.concatenate([train.tokens, val.tokens]).astype(np.uint8).tobytes()
    assert joined == text + b"\x00" and list(train.lengths) == [len(train)]
