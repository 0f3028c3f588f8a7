"""Evaluation and resume use the corpus a checkpoint was trained on, identified by a hash of its contents; and
``--dtype`` applies to a ``--ckpt`` model source."""

import argparse
import dataclasses
import shutil

import numpy as np
import pytest

from moejax.config import ModelConfig, MoEConfig, RouterConfig, TrainConfig
from moejax.train import data as data_lib
from moejax.train.trainer import evaluate_checkpoint, train


def _write_corpus(root, seed: int, n: int = 12):
    root.mkdir()
    rng = np.random.default_rng(seed)
    words = ["def", "return", "import", "class", "self", "for", "in", "if", "else", "x", "y", "(", ")", ":"]
    for i in range(n):
        (root / f"mod{i:02d}.py").write_text(" ".join(rng.choice(words, size=int(rng.integers(80, 160)))) + "\n")
    return root


CFG = ModelConfig(vocab_size=260, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=64,
                  moe=MoEConfig(num_experts=4, d_ff=16, router=RouterConfig(type="topk", top_k=2)))
TC = TrainConfig(steps=1, seq_len=32, global_batch=4, log_every=1, eval_every=1, eval_batches=1, ckpt_every=1,
                 warmup_steps=1, val_percent=20.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-step run on a custom corpus; a second corpus with other contents."""
    base = tmp_path_factory.mktemp("evalcorpus")
    corpus = _write_corpus(base / "corpus", seed=0)
    other = _write_corpus(base / "other", seed=1)
    out = base / "run"
    train(CFG, TC, str(out), corpus=str(corpus), cache_dir=str(base / "cache"), progress=False)
    return {"out": str(out), "corpus": str(corpus), "other": str(other), "cache": str(base / "cache")}


def test_content_hash_changes_with_contents_not_only_names(tmp_path):
    root = _write_corpus(tmp_path / "c", seed=0)
    cache = str(tmp_path / "cache")
    _, info = data_lib.build_corpus(str(root), val_percent=20.0, cache_dir=cache)
    assert len(info.content_hash) == 16 and info.to_dict()["content_hash"] == info.content_hash
    _, again = data_lib.build_corpus(str(root), val_percent=20.0, cache_dir=cache)  # from the cache
    assert again.content_hash == info.content_hash
    f = root / "mod03.py"
    f.write_text(f.read_text().replace("def", "fed"))  # same name, same size, other bytes
    streams2, info2 = data_lib.build_corpus(str(root), val_percent=20.0, cache_dir=cache)
    assert info2.files_hash == info.files_hash  # the file list hash cannot see the edit
    assert info2.content_hash != info.content_hash
    after = np.concatenate([np.asarray(streams2[s].tokens) for s in ("train", "validation")])
    assert b"fed" in bytes(int(t) for t in after if t < 256)  # the cache was rebuilt from the edited file
    # the hash depends on contents and relative paths, not on where the corpus lives
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    assert data_lib.build_corpus(str(copy), val_percent=20.0, cache_dir=cache)[1].content_hash == info2.content_hash


def test_eval_defaults_to_the_checkpoint_corpus(run):
    r = evaluate_checkpoint(run["out"], batch=2, cache_dir=run["cache"])
    _, info = data_lib.build_corpus(run["corpus"], val_percent=TC.val_percent, cache_dir=run["cache"])
    assert r["corpus_root"] == info.root and r["corpus_content_hash"] == info.content_hash
    assert r["corpus_mismatch"] is None
    explicit = evaluate_checkpoint(run["out"], corpus=run["corpus"], batch=2, cache_dir=run["cache"])
    assert explicit["val_bits_per_byte"] == r["val_bits_per_byte"] and r["val_bytes"] > 0


def test_eval_on_another_corpus_needs_the_override(run):
    _, mine = data_lib.build_corpus(run["corpus"], val_percent=TC.val_percent, cache_dir=run["cache"])
    _, other = data_lib.build_corpus(run["other"], val_percent=TC.val_percent, cache_dir=run["cache"])
    assert mine.content_hash != other.content_hash
    with pytest.raises(ValueError, match="allow_mismatch") as e:
        evaluate_checkpoint(run["out"], corpus=run["other"], batch=2, cache_dir=run["cache"])
    assert mine.content_hash in str(e.value) and other.content_hash in str(e.value)
    r = evaluate_checkpoint(run["out"], corpus=run["other"], batch=2, cache_dir=run["cache"], allow_mismatch=True)
    assert r["corpus_content_hash"] == other.content_hash and other.content_hash in r["corpus_mismatch"]


def test_cli_eval_corpus_check(run, capsys, monkeypatch):
    from moejax.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", run["cache"] + "-xdg")
    assert main(["eval", "--ckpt", run["out"], "--batch", "2"]) == 0
    out = capsys.readouterr().out
    _, mine = data_lib.build_corpus(run["corpus"], val_percent=TC.val_percent, cache_dir=run["cache"])
    assert mine.content_hash in out and run["corpus"] in out
    assert main(["eval", "--ckpt", run["out"], "--corpus", run["other"], "--batch", "2"]) == 2
    err = capsys.readouterr().err
    assert "--allow-corpus-mismatch" in err and mine.content_hash in err
    assert main(["eval", "--ckpt", run["out"], "--corpus", run["other"], "--allow-corpus-mismatch",
                 "--batch", "2"]) == 0
    assert "warning" in capsys.readouterr().err


def test_records_without_content_hash(run):
    """A checkpoint without a corpus record needs an explicit corpus and the override; an old record (file-list
    hash only) is compared by its file list, with a warning."""
    _, info = data_lib.build_corpus(run["corpus"], val_percent=TC.val_percent, cache_dir=run["cache"])
    assert "content hash: none" in data_lib.corpus_mismatch(None, info)
    legacy = {"root": info.root, "files_hash": info.files_hash}
    with pytest.warns(UserWarning, match="contents are not verified"):
        assert data_lib.corpus_mismatch(legacy, info) is None
    why = data_lib.corpus_mismatch({**legacy, "files_hash": "0" * 16}, info)
    assert "0" * 16 in why and info.content_hash in why


def test_resume_refuses_an_edited_corpus(tmp_path):
    corpus = _write_corpus(tmp_path / "c", seed=2, n=6)
    kw = {"corpus": str(corpus), "cache_dir": str(tmp_path / "cache"), "progress": False}
    tc = TC
    train(CFG, tc, str(tmp_path / "run"), max_steps=0, **kw)  # a step-0 checkpoint records the corpus
    _, before = data_lib.build_corpus(str(corpus), val_percent=tc.val_percent, cache_dir=kw["cache_dir"])
    f = corpus / "mod01.py"
    f.write_text(f.read_text().replace("if", "fi"))  # same file list, other contents
    _, after = data_lib.build_corpus(str(corpus), val_percent=tc.val_percent, cache_dir=kw["cache_dir"])
    with pytest.raises(ValueError, match="cannot resume") as e:
        train(CFG, dataclasses.replace(tc, steps=2), str(tmp_path / "run"), resume=True, **kw)
    assert before.content_hash in str(e.value) and after.content_hash in str(e.value)


def test_dtype_applies_to_a_checkpoint_source(run):
    import jax.numpy as jnp

    from moejax.cli import _model_from_args

    def load(dtype):
        return _model_from_args(argparse.Namespace(preset=None, config=None, hf=None, ckpt=run["out"], dtype=dtype,
                                                   seed=0))

    m32, cfg32, _ = load(None)  # default: the checkpoint's training compute dtype
    m16, cfg16, _ = load("bfloat16")
    assert cfg32.dtype == "float32" and cfg16.dtype == "bfloat16" and cfg16.param_dtype == cfg32.param_dtype
    tok = jnp.array([[1, 2, 3, 4, 5]])
    a, b = np.asarray(m32(tok).logits, np.float32), np.asarray(m16(tok).logits, np.float32)
    assert not np.array_equal(a, b)  # computed in bfloat16
    np.testing.assert_allclose(b, a, atol=0.1, rtol=0.05)
