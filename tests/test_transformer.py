"""Decoder LM: KV-cache decoding, padding, packing, layer runs, generation, sampling, CLI."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import ModelConfig, MoEConfig, RouterConfig
from moejax.models.generate import _generate, generate
from moejax.models.transformer import Transformer, layer_runs
from moejax.nn.sampling import sample, top_p_filter
from moejax.nn.shapes import pow2_bucket

# Tolerance for float32 paths that compute the same math in a different order (cache vs no cache):
# max-abs error <= 1e-5 * max(1, max|reference|).
TOL = 1e-5


def small_cfg(**kw):
    base = ModelConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=128,
                       moe=MoEConfig(num_experts=4, d_ff=24, router=RouterConfig(type="topk", top_k=2)),
                       dense_layers=(0,))
    return dataclasses.replace(base, **kw).validate()


@pytest.fixture(scope="module")
def model():
    return Transformer(small_cfg(), rngs=nnx.Rngs(0))


def close(a, b, tol=TOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.max(np.abs(a - b))
    assert err <= tol * max(1.0, np.max(np.abs(b))), err


def test_layer_runs():
    cfg = small_cfg(n_layers=6, moe_every=2, dense_layers=(3,))
    assert cfg.layer_kinds() == ("dense", "moe", "dense", "dense", "dense", "moe")
    assert layer_runs(cfg) == (("dense", 0, 1), ("moe", 1, 1), ("dense", 2, 3), ("moe", 5, 1))


def test_cache_prefill_and_decode_match_full_forward(model):
    tok = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 97)
    full = model(tok).logits
    cache = model.init_cache(2, 16)
    o1 = model(tok[:, :8], cache=cache, cache_index=0)
    close(o1.logits, full[:, :8])
    c = o1.cache
    for i in range(8, 12):
        o = model(tok[:, i:i + 1], cache=c, cache_index=i)
        close(o.logits[:, 0], full[:, i])
        c = o.cache
    assert len(model(tok).aux["load_balance_loss"]) == 2  # two MoE layers of three


def test_left_padding_matches_unpadded(model):
    a = [5, 6, 7, 8, 9, 10]
    b = [11, 12, 13]
    tok = jnp.array([a, [0, 0, 0] + b])
    mask = jnp.array([[1] * 6, [0, 0, 0, 1, 1, 1]])
    pos = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
    out = model(tok, attention_mask=mask, positions=pos).logits
    close(out[0], model(jnp.array([a])).logits[0])
    close(out[1, 3:], model(jnp.array([b])).logits[0])


def test_packed_segments_match_separate_documents(model):
    a, b = [1, 2, 3, 4, 5], [6, 7, 8]
    tok = jnp.array([a + b])
    seg = jnp.array([[1] * 5 + [2] * 3])
    pos = jnp.array([list(range(5)) + list(range(3))])
    out = model(tok, segment_ids=seg, positions=pos).logits
    close(out[0, :5], model(jnp.array([a])).logits[0])
    close(out[0, 5:], model(jnp.array([b])).logits[0])


def test_partial_layer_ranges_compose(model):
    tok = jax.random.randint(jax.random.PRNGKey(2), (1, 7), 0, 97)
    full = model(tok).logits
    h = model(tok, layers=(0, 2)).logits  # hidden after two layers
    out = model(tok, layers=(2, 3), hidden=h).logits
    close(out, full)


def test_generate_greedy_equals_teacher_forced_argmax(model):
    prompts = [[3, 4, 5, 6], [7, 8]]
    res = generate(model, prompts, 10, return_logits=True)
    for b, p in enumerate(prompts):
        seq = jnp.array([p + res.tokens[b].tolist()])
        lg = model(seq).logits[0, len(p) - 1:len(p) - 1 + 10]
        close(res.logits[b], lg)
        assert res.tokens[b].tolist() == np.argmax(np.asarray(lg), -1).tolist()


def test_layer_loops_agree(model):
    """The per-layer-weights loop (``layer_loop="unroll"``, the CPU default) equals the scanned stack: a
    forward over a dense + MoE run with a KV cache, and generation."""
    from moejax.models.transformer import resolve_layer_loop, unstack_layers

    toks = jnp.array([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
    ls = unstack_layers(model)
    assert [len(r) for r in ls] == [n for _, _, n in model.runs]
    a = model(toks, cache=model.init_cache(2, 8), cache_index=0)
    b = model(toks, cache=model.init_cache(2, 8), cache_index=0, layer_states=ls)
    close(b.logits, a.logits)
    close(b.cache.k[1], a.cache.k[1])
    close(b.aux["load_balance_loss"], a.aux["load_balance_loss"])
    # a per-layer cache (one buffer per layer) gives the same result with either loop, also for a layer range
    for states in (ls, None):
        c = model(toks, cache=model.init_cache(2, 8, per_layer=True), cache_index=0, layer_states=states)
        close(c.logits, a.logits)
        assert isinstance(c.cache.k[1], tuple) and len(c.cache.k[1]) == len(ls[1])
        close(jnp.stack(c.cache.k[1]), a.cache.k[1])
        close(jnp.stack(c.cache.v[0]), a.cache.v[0])
        h = model(toks, cache=model.init_cache(2, 8, per_layer=True), cache_index=0, layer_states=states,
                  layers=(0, 2))
        close(jnp.stack(h.cache.k[1])[:1], a.cache.k[1][:1])  # layer 1 (first of the MoE run) ran
        assert float(jnp.abs(h.cache.k[1][1]).max()) == 0.0  # layer 2 did not
    g = {loop: generate(model, [[3, 4, 5], [6]], 6, return_logits=True, layer_loop=loop) for loop in ("scan", "unroll")}
    close(g["unroll"].logits, g["scan"].logits)
    assert resolve_layer_loop("auto") == ("unroll" if jax.default_backend() == "cpu" else "scan")
    with pytest.raises(ValueError, match="layer_loop"):
        generate(model, [[1]], 2, layer_loop="python")


def test_generate_compiles_once_per_bucket(model):
    generate(model, [[1, 2, 3]], 5)
    n = _generate._cache_size()
    generate(model, [[4, 5, 6, 7, 8]], 9)  # same buckets (16, 16)
    assert _generate._cache_size() == n
    assert pow2_bucket(17, 16) == 32 and pow2_bucket(3, 16) == 16


def test_generate_eos_and_validation(model):
    res = generate(model, [[1, 2, 3]], 6)
    eos = int(res.tokens[0, 2])
    stopped = generate(model, [[1, 2, 3]], 6, eos_id=eos)
    first = res.tokens[0].tolist().index(eos)
    assert stopped.lengths[0] == first + 1
    assert stopped.as_lists()[0] == res.tokens[0, :first + 1].tolist()
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], 0)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, [[1000]], 2)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 100], 100)


def test_sampling():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(top_p_filter(logits, jnp.array([0.7]))))
    assert kept.tolist() == [[True, True, False, False]]
    key = jax.random.PRNGKey(0)
    assert int(sample(logits, key, temperature=0.0)[0]) == 0
    draws = [int(sample(logits, jax.random.fold_in(key, i), temperature=1.0, top_p=0.7)[0]) for i in range(50)]
    assert set(draws) <= {0, 1} and len(set(draws)) == 2


def test_bfloat16_model_runs_close_to_float32():
    cfg = small_cfg()
    m32 = Transformer(cfg, rngs=nnx.Rngs(0))
    m16 = Transformer(dataclasses.replace(cfg, dtype="bfloat16"), rngs=nnx.Rngs(0))
    tok = jax.random.randint(jax.random.PRNGKey(3), (2, 8), 0, 97)
    a, b = m32(tok).logits, m16(tok).logits
    assert b.dtype == jnp.float32
    # bf16 has an 8-bit mantissa: relative L2 error of the logits within 5e-2.
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 5e-2


def test_cli_generate_prints_ids_on_last_line(capsys):
    from moejax.cli import main
    assert main(["generate", "--preset", "tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--greedy"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    ids = [int(t) for t in last.split(",")]
    assert len(ids) == 4 and all(0 <= t < 512 for t in ids)
    assert main(["generate", "--preset", "nope", "--prompt-ids", "1"]) == 2


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_gives_the_same_gradients(remat):
    cfg = small_cfg()
    tok = jax.random.randint(jax.random.PRNGKey(4), (2, 8), 0, 97)

    def grads(c):
        m = Transformer(c, rngs=nnx.Rngs(0))
        gdef, params, rest = nnx.split(m, nnx.Param, ...)
        f = lambda p: jnp.mean(nnx.merge(gdef, p, rest)(tok).logits ** 2)
        return jax.tree.leaves(jax.jit(jax.grad(f))(params))

    for a, b in zip(grads(dataclasses.replace(cfg, remat=remat)), grads(cfg), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
