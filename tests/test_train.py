"""Byte-level data pipeline, trainer, checkpoints and resume."""

import dataclasses
import json
import os

import numpy as np
import pytest

from moejax.config import ModelConfig, MoEConfig, RouterConfig, TrainConfig
from moejax.train import data as data_lib
from moejax.train.trainer import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus: 24 documents of a few hundred bytes each (deterministic)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["def", "return", "import", "class", "self", "for", "in", "if", "else", "x", "y", "(", ")", ":"]
    for i in range(24):
        text = " ".join(rng.choice(words, size=int(rng.integers(60, 160)))) + "\n"
        (root / f"mod{i:02d}.py").write_text(text)
    (root / "tests").mkdir()
    (root / "tests" / "test_skip.py").write_text("excluded\n")
    return str(root)


def tiny_cfg(**moe_kw):
    moe_kw.setdefault("router", RouterConfig(type="topk", top_k=2))
    moe = MoEConfig(num_experts=4, d_ff=32, **moe_kw)
    return ModelConfig(vocab_size=260, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64,
                       moe=moe).validate()


def tiny_tc(**kw):
    base = TrainConfig(steps=8, seq_len=32, global_batch=4, log_every=1, eval_every=4, eval_batches=2,
                       ckpt_every=4, warmup_steps=2, val_percent=20.0)
    return dataclasses.replace(base, **kw).validate()


def test_corpus_split_is_deterministic_and_excludes_tests(corpus, tmp_path):
    files = data_lib.list_corpus(corpus)
    assert len(files) == 24 and not any("test" in f for f in files)
    streams, info = data_lib.build_corpus(corpus, val_percent=20.0, cache_dir=str(tmp_path))
    streams2, info2 = data_lib.build_corpus(corpus, val_percent=20.0, cache_dir=str(tmp_path / "other"))
    assert info.files_hash == info2.files_hash and info.n_tokens == info2.n_tokens
    assert info.n_files["train"] + info.n_files["validation"] == 24 and info.n_files["validation"] > 0
    np.testing.assert_array_equal(np.asarray(streams["train"].tokens), np.asarray(streams2["train"].tokens))
    total = sum(os.path.getsize(os.path.join(corpus, f)) for f in files)
    assert info.n_tokens["train"] + info.n_tokens["validation"] == total + 24  # one EOS per document


def test_segments_and_positions_follow_documents(corpus, tmp_path):
    streams, _ = data_lib.build_corpus(corpus, val_percent=20.0, cache_dir=str(tmp_path))
    s = streams["train"]
    L = 64
    for i in range(s.num_sequences(L)):
        seq = s.sequence(i, L)
        toks, seg, pos = seq["tokens"], seq["segment_ids"], seq["positions"]
        lo = i * L
        starts = set((s.starts[(s.starts > lo) & (s.starts < lo + L)] - lo).tolist())
        assert seg[0] == 1 and pos[0] == 0
        for j in range(1, L):
            if j in starts:  # a new document starts: new segment, positions restart, previous token is EOS
                assert seg[j] == seg[j - 1] + 1 and pos[j] == 0 and toks[j - 1] == data_lib.EOS
            else:
                assert seg[j] == seg[j - 1] and pos[j] == pos[j - 1] + 1


def test_iterator_resumes_and_shards(corpus, tmp_path):
    streams, _ = data_lib.build_corpus(corpus, val_percent=20.0, cache_dir=str(tmp_path))
    mk = lambda **kw: data_lib.BatchIterator(streams["train"], seq_len=33, global_batch=4, seed=3, **kw)  # noqa
    a = mk()
    ref = [next(a)["tokens"] for _ in range(a.steps_per_epoch + 3)]  # crosses an epoch boundary
    b = mk()
    for _ in range(5):
        next(b)
    c = mk()
    c.restore(b.state())
    for k in range(5, len(ref)):
        np.testing.assert_array_equal(next(c)["tokens"], ref[k])
    ranks = [mk(rank=r, num_ranks=2) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate([next(r)["tokens"] for r in ranks]), ref[0])
    with pytest.raises(ValueError, match="seed"):
        data_lib.BatchIterator(streams["train"], seq_len=33, global_batch=4, seed=4).restore(b.state())


def _losses(path):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(path)) if "loss" in r]


def test_resume_after_interruption_reproduces_trajectory(corpus, tmp_path):
    cfg, tc = tiny_cfg(), tiny_tc()
    cache = str(tmp_path / "cache")
    full = train(cfg, tc, str(tmp_path / "full"), corpus=corpus, cache_dir=cache, progress=False)
    # "Killed" after 6 steps (last checkpoint at step 4 plus the final save at 6), then resumed.
    train(cfg, tc, str(tmp_path / "part"), corpus=corpus, cache_dir=cache, progress=False, max_steps=6)
    resumed = train(cfg, tc, str(tmp_path / "part"), corpus=corpus, cache_dir=cache, progress=False, resume=True)
    a = dict(_losses(tmp_path / "full" / "log.jsonl"))
    b = dict(_losses(tmp_path / "part" / "log.jsonl"))
    assert a == b  # float32 on CPU, same mesh: bit-identical trajectory
    assert resumed["val_bits_per_byte"] == full["val_bits_per_byte"]
    assert a[8] < a[1]  # it learns


def test_bad_inputs_fail_before_compute(corpus, tmp_path):
    cfg, tc = tiny_cfg(), tiny_tc(steps=2, eval_every=2, ckpt_every=2)
    cache = str(tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="corpus path"):
        train(cfg, tc, str(tmp_path / "x"), corpus=str(tmp_path / "missing"), cache_dir=cache, progress=False)
    out = str(tmp_path / "run")
    train(cfg, tc, out, corpus=corpus, cache_dir=cache, progress=False)
    good = sorted(os.listdir(os.path.join(out, "checkpoints")))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(cfg, tc, out, corpus=corpus, cache_dir=cache, progress=False)
    other = dataclasses.replace(cfg, d_model=48)
    with pytest.raises(ValueError, match="model config differs"):
        train(other, tc, out, corpus=corpus, cache_dir=cache, progress=False, resume=True)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == good  # the good checkpoint is untouched
    with pytest.raises(ValueError, match="TrainConfig.grad_accum"):
        tiny_tc(grad_accum=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        train(cfg, tiny_tc(seq_len=128), str(tmp_path / "y"), corpus=corpus, cache_dir=cache, progress=False)


def test_sigmoid_router_bias_is_updated(corpus, tmp_path):
    from flax import nnx

    from moejax.nn.routers import RouterBias
    from moejax.train.checkpoint import load_model
    cfg = tiny_cfg(router=RouterConfig(type="sigmoid", top_k=2, bias_update_rate=0.01))
    out = str(tmp_path / "run")
    train(cfg, tiny_tc(steps=3, eval_every=3, ckpt_every=3), out, corpus=corpus, cache_dir=str(tmp_path / "c"),
          progress=False)
    model, _, meta = load_model(out)
    bias = np.concatenate([np.ravel(v) for v in __import__("jax").tree.leaves(nnx.state(model, RouterBias))])
    assert np.abs(bias).max() > 0 and meta["step"] == 3


@pytest.mark.hf
def test_export_trained_checkpoint_to_hf(corpus, tmp_path):
    pytest.importorskip("transformers")
    import jax.numpy as jnp

    from moejax.cli import main
    from moejax.models.hf import load_hf
    from moejax.train.checkpoint import load_model
    cfg = dataclasses.replace(tiny_cfg(), vocab_size=260)
    out = str(tmp_path / "run")
    train(cfg, tiny_tc(steps=2, eval_every=2, ckpt_every=2), out, corpus=corpus, cache_dir=str(tmp_path / "c"),
          progress=False)
    assert main(["export", "--ckpt", out, "--out", str(tmp_path / "hf")]) == 0
    trained, _, _ = load_model(out)
    reloaded, _ = load_hf(str(tmp_path / "hf"))
    tok = jnp.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(np.asarray(trained(tok).logits), np.asarray(reloaded(tok).logits))
    assert main(["export", "--ckpt", out, "--out", str(tmp_path / "hf")]) == 2  # exists, no --overwrite


def test_corrupt_checkpoint_fails_clearly(corpus, tmp_path):
    cfg, tc = tiny_cfg(), tiny_tc(steps=2, eval_every=2, ckpt_every=2)
    out = tmp_path / "run"
    train(cfg, tc, str(out), corpus=corpus, cache_dir=str(tmp_path / "c"), progress=False)
    data_files = [p for p in (out / "checkpoints" / "2" / "state").rglob("*") if p.is_file() and "ocdbt" in str(p)]
    assert data_files
    for p in data_files:
        p.write_bytes(p.read_bytes()[:16])
    with pytest.raises(ValueError, match="incompatible with this model or corrupt"):
        train(cfg, dataclasses.replace(tc, steps=4), str(out), corpus=corpus, cache_dir=str(tmp_path / "c"),
              progress=False, resume=True)
    assert sorted(os.listdir(out / "checkpoints")) == ["2"]  # nothing new written over it
