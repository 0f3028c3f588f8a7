"""Hugging Face import/export: logit and greedy-generation parity with transformers, round trips, bad input.

Needs the ``[hf]`` extra (transformers + torch); the module is skipped cleanly without it. Models are tiny
random Mixtral / Qwen3-MoE / Qwen2-MoE built with transformers, with every parameter (norm scales and biases
included) randomized so that a mapping mistake anywhere changes the logits.
"""

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st_numpy = pytest.importorskip("safetensors.numpy")

import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
from flax import nnx  # noqa: E402

from moejax.models.hf import config_from_hf, config_to_hf, load_hf, save_hf  # noqa: E402

try:  # the jitted batched generator, when present
    from moejax.models.generate import generate as mj_generate
except ImportError:  # pragma: no cover
    mj_generate = None

pytestmark = pytest.mark.hf

LOGIT_TOL = 1e-4      # max-abs, float32, teacher-forced
MARGIN = 1e-3         # greedy steps are compared while the top-2 logit margin is at least this
N_NEW = 32
VOCAB = 128
PAD = 0

COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _hf_config(name):
    if name == "mixtral":
        return transformers.MixtralConfig(**COMMON, num_hidden_layers=2, intermediate_size=32, num_local_experts=8,
                                          num_experts_per_tok=2, rope_parameters={"rope_theta": 1e6,
                                                                                  "rope_type": "default"})
    if name == "qwen3_moe":  # QK-norm, explicit head_dim != hidden/heads, tied embeddings, normalized top-k
        return transformers.Qwen3MoeConfig(**COMMON, num_hidden_layers=2, head_dim=24, intermediate_size=96,
                                           moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                           norm_topk_prob=True, tie_word_embeddings=True)
    if name == "qwen2_moe":  # q/k/v bias, gated shared expert, decoder_sparse_step=2 + mlp_only_layers=[3]
        return transformers.Qwen2MoeConfig(**COMMON, num_hidden_layers=4, intermediate_size=96,
                                           moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                           num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                                           decoder_sparse_step=2, mlp_only_layers=[3])
    raise AssertionError(name)


_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def _randomize(model, seed):
    """Every parameter random: norm scales ~ 1 + 0.1 N, biases ~ 0.1 N, matrices ~ N / sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            else:
                p.copy_(r / p.shape[-1] ** 0.5)


def _hf_model(name, seed=0):
    torch.manual_seed(seed)
    m = getattr(transformers, _CLASSES[name])(_hf_config(name))
    _randomize(m, seed)
    return m.eval()


def _inputs(seed=0, lengths=(9, 14), S=14):
    """A left-padded batch: tokens, mask and HF generate()'s positions (cumsum(mask) - 1, 0 on padding)."""
    rs = np.random.RandomState(seed)
    tok = np.full((len(lengths), S), PAD, np.int64)
    mask = np.zeros((len(lengths), S), np.int64)
    for b, n in enumerate(lengths):
        tok[b, S - n:] = rs.randint(1, VOCAB, n)
        mask[b, S - n:] = 1
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return tok, mask, pos


def _hf_logits(hf_model, tok, mask, pos):
    with torch.no_grad():
        out = hf_model(input_ids=torch.tensor(tok), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


@nnx.jit
def _mj_forward(model, tok, mask, pos):
    return model(tok, attention_mask=mask, positions=pos).logits


def _mj_logits(model, tok, mask, pos):
    return np.asarray(_mj_forward(model, jnp.asarray(tok, jnp.int32), jnp.asarray(mask, jnp.int32),
                                  jnp.asarray(pos, jnp.int32)))


def _max_err(a, b, mask):
    v = mask.astype(bool)
    return float(np.max(np.abs(a[v].astype(np.float64) - b[v].astype(np.float64))))


def _params(model):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


CASES = [("mixtral", "float32"), ("qwen3_moe", "float32"), ("qwen2_moe", "float32"), ("mixtral", "bfloat16")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{(name, dtype): (hf_dir, hf_model_float32)}; the qwen3_moe checkpoint is sharded."""
    out = {}
    for name, dtype in CASES:
        m = _hf_model(name)
        d = str(tmp_path_factory.mktemp(f"{name}-{dtype}"))
        if dtype == "bfloat16":
            m = m.to(torch.bfloat16)
        kw = {"max_shard_size": "100KB"} if name == "qwen3_moe" else {}
        m.save_pretrained(d, **kw)
        if dtype == "bfloat16":  # the reference: the same bf16 weights, computed in float32
            m = getattr(transformers, _CLASSES[name]).from_pretrained(d, dtype=torch.float32).eval()
        out[(name, dtype)] = (d, m)
    return out


@pytest.fixture(scope="module")
def loaded(saved):
    return {k: load_hf(d) for k, (d, _) in saved.items()}


# ------------------------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("name,dtype", CASES)
def test_logits_match_transformers(saved, loaded, name, dtype):
    d, hf_model = saved[(name, dtype)]
    model, cfg = loaded[(name, dtype)]
    assert cfg.dtype == "float32"
    tok, mask, pos = _inputs()
    ref = _hf_logits(hf_model, tok, mask, pos)
    err = _max_err(_mj_logits(model, tok, mask, pos), ref, mask)
    print(f"\n{name} ({dtype} checkpoint): max-abs logit error {err:.3g} (max |logit| {np.abs(ref).max():.3g})")
    assert err <= LOGIT_TOL, err


def test_top1_renormalized_routing(tmp_path):
    """Mixtral with one expert per token: HF's renormalized weight is exactly 1, and so is moejax's."""
    cfg = _hf_config("mixtral")
    cfg.num_experts_per_tok = 1
    cfg.num_hidden_layers = 1
    torch.manual_seed(0)
    m = transformers.MixtralForCausalLM(cfg)
    _randomize(m, 0)
    m.eval().save_pretrained(str(tmp_path))
    model, _ = load_hf(str(tmp_path))
    tok, mask, pos = _inputs()
    err = _max_err(_mj_logits(model, tok, mask, pos), _hf_logits(m, tok, mask, pos), mask)
    assert err <= LOGIT_TOL, err


def test_checkpoint_layout_seen(saved):
    """transformers 5 save_pretrained writes per-expert tensors (Mixtral under block_sparse_moe), sharded here."""
    d = saved[("mixtral", "float32")][0]
    names = set(st_numpy.load_file(os.path.join(d, "model.safetensors")))
    assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in names
    assert os.path.exists(os.path.join(saved[("qwen3_moe", "float32")][0], "model.safetensors.index.json"))


def test_bf16_checkpoint_values_exact(saved):
    d = saved[("mixtral", "bfloat16")][0]
    model, cfg = load_hf(d, dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16" and model.embed[...].dtype == jnp.bfloat16
    raw = st_numpy.load_file(os.path.join(d, "model.safetensors"))
    w1 = raw["model.layers.1.block_sparse_moe.experts.5.w1.weight"]  # [F, D] gate of expert 5, layer 1
    got = np.asarray(model.stacks[0].moe.experts.w_gate[...])[1, 5]  # [D, F]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.view(np.uint16), np.ascontiguousarray(w1.T).view(np.uint16))
    model32, _ = load_hf(d)  # bf16 -> float32 is exact
    np.testing.assert_array_equal(np.asarray(model32.stacks[0].moe.experts.w_gate[...])[1, 5],
                                  w1.T.astype(np.float32))


def _mj_greedy(model, tok, mask, n_new):
    """Greedy tokens [B, n_new] and the logits [B, n_new, V] each was chosen from."""
    if mj_generate is not None:
        prompts = [list(t[m.astype(bool)]) for t, m in zip(tok, mask)]
        r = mj_generate(model, prompts, n_new, greedy=True, return_logits=True, pad_id=PAD)
        return np.asarray(r.tokens), np.asarray(r.logits)
    # Fallback: a plain loop over the KV-cache API.
    B, S = tok.shape
    cache = model.init_cache(B, S + n_new)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    out = model(jnp.asarray(tok, jnp.int32), positions=jnp.asarray(pos, jnp.int32),
                attention_mask=jnp.asarray(mask, jnp.int32), cache=cache, cache_index=0)
    logits, cache, nxt = out.logits[:, -1], out.cache, pos[:, -1] + 1
    toks, lgs = [], []
    for i in range(n_new):
        t = jnp.argmax(logits, -1).astype(jnp.int32)
        toks.append(t)
        lgs.append(logits)
        if i == n_new - 1:
            break
        out = model(t[:, None], positions=jnp.asarray(nxt[:, None] + i, jnp.int32),
                    attention_mask=jnp.ones((B, 1), jnp.int32), cache=cache, cache_index=S + i)
        logits, cache = out.logits[:, 0], out.cache
    return np.stack([np.asarray(t) for t in toks], 1), np.stack([np.asarray(x) for x in lgs], 1)


def _margin(logits):
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_greedy_generation_matches_transformers(saved, loaded, name):
    _, hf_model = saved[(name, "float32")]
    model, _ = loaded[(name, "float32")]
    tok, mask, _ = _inputs(seed=1, lengths=(5, 11), S=11)
    with torch.no_grad():
        ref = hf_model.generate(input_ids=torch.tensor(tok), attention_mask=torch.tensor(mask), max_new_tokens=N_NEW,
                                do_sample=False, pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
    ref_tok = ref.sequences[:, tok.shape[1]:].numpy()
    ref_lg = torch.stack(ref.logits, 1).float().numpy()
    assert ref_tok.shape == (2, N_NEW)
    got_tok, got_lg = _mj_greedy(model, tok, mask, N_NEW)
    compared = 0
    for b in range(tok.shape[0]):
        for t in range(N_NEW):
            if min(_margin(ref_lg[b, t]), _margin(got_lg[b, t])) < MARGIN:
                break  # a near tie: the continuations may legitimately differ from here on
            assert got_tok[b, t] == ref_tok[b, t], (b, t, got_tok[b], ref_tok[b])
            err = np.max(np.abs(got_lg[b, t] - ref_lg[b, t]))
            assert err <= LOGIT_TOL, (b, t, err)
            compared += 1
    print(f"\n{name}: {compared} greedy steps compared")
    assert compared >= N_NEW  # the random models are far from ties; most steps must be checked


# ------------------------------------------------------------------------------------------------ export

@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_export_roundtrip(saved, loaded, tmp_path, name, layout):
    _, hf_model = saved[(name, "float32")]
    model, cfg = loaded[(name, "float32")]
    out = str(tmp_path / "export")
    save_hf(model, cfg, out, layout=layout)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    names = set(st_numpy.load_file(os.path.join(out, "model.safetensors")))
    fused = [n for n in names if n.endswith("experts.gate_up_proj")]
    assert bool(fused) == (layout == "fused")
    if name == "mixtral" and layout == "per_expert":
        assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in names

    # moejax -> HF -> moejax: bit-exact, same config.
    model2, cfg2 = load_hf(out)
    assert cfg2 == cfg
    p1, p2 = _params(model), _params(model2)
    assert p1.keys() == p2.keys()
    for k in p1:
        assert p1[k].dtype == p2[k].dtype and np.array_equal(p1[k], p2[k]), k

    # transformers loads the export and computes the same logits.
    hf2 = getattr(transformers, _CLASSES[name]).from_pretrained(out, dtype=torch.float32).eval()
    tok, mask, pos = _inputs(seed=2)
    err = _max_err(_hf_logits(hf2, tok, mask, pos), _hf_logits(hf_model, tok, mask, pos), mask)
    assert err <= 1e-6, err


def test_export_bfloat16_and_overwrite(saved, loaded, tmp_path):
    model, cfg = loaded[("qwen2_moe", "float32")]
    out = str(tmp_path / "bf16")
    save_hf(model, cfg, out, dtype="bfloat16", layout="fused")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    m2, cfg2 = load_hf(out, dtype=None)  # dtype from the checkpoint
    assert cfg2.param_dtype == "bfloat16"
    for k, v in _params(m2).items():
        ref = _params(model)[k].astype(ml_dtypes.bfloat16)
        assert np.array_equal(v.view(np.uint16), ref.view(np.uint16)), k
    # bf16 -> export -> import is bit-exact too.
    out2 = str(tmp_path / "bf16-again")
    save_hf(m2, cfg2, out2)
    m3, _ = load_hf(out2, dtype="bfloat16")
    for k, v in _params(m3).items():
        assert np.array_equal(v.view(np.uint16), _params(m2)[k].view(np.uint16)), k
    # transformers reads the bf16 export.
    hf2 = transformers.Qwen2MoeForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert hf2.model.embed_tokens.weight.shape == (VOCAB, 64)

    with pytest.raises(FileExistsError, match="overwrite"):
        save_hf(model, cfg, out)
    save_hf(model, cfg, out, overwrite=True)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary leftovers
    m4, _ = load_hf(out)
    assert np.array_equal(np.asarray(m4.embed[...]), np.asarray(model.embed[...]))


def test_export_rejects_unrepresentable(loaded, tmp_path):
    model, cfg = loaded[("qwen2_moe", "float32")]
    with pytest.raises(ValueError, match="qk_norm"):
        save_hf(model, cfg, str(tmp_path / "x"), model_type="qwen3_moe")
    with pytest.raises(ValueError, match="layout"):
        save_hf(model, cfg, str(tmp_path / "x"), layout="packed")
    assert not os.path.exists(tmp_path / "x")
    assert config_to_hf(cfg)["model_type"] == "qwen2_moe"


# ------------------------------------------------------------------------------------------------ bad input

def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_weights(d, fn):
    """Apply ``fn`` to the tensor dict of a single-file checkpoint in place."""
    p = os.path.join(d, "model.safetensors")
    t = st_numpy.load_file(p)
    fn(t)
    st_numpy.save_file(t, p, metadata={"format": "pt"})


def _edit_config(d, fn):
    p = os.path.join(d, "config.json")
    with open(p) as f:
        c = json.load(f)
    fn(c)
    with open(p, "w") as f:
        json.dump(c, f)


def test_missing_tensor(saved, tmp_path):
    d = _copy(saved[("mixtral", "float32")][0], tmp_path / "m")
    name = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    _edit_weights(d, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.block_sparse_moe\.experts\.3\.w3"
                                         r"\.weight' \(expected shape \(32, 64\)\)"):
        load_hf(d)


def test_wrong_shape(saved, tmp_path):
    d = _copy(saved[("qwen2_moe", "float32")][0], tmp_path / "m")
    name = "model.layers.1.mlp.shared_expert.up_proj.weight"
    _edit_weights(d, lambda t: t.__setitem__(name, np.ascontiguousarray(t[name].T)))
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.shared_expert\.up_proj\.weight' has shape "
                                         r"\(64, 48\), expected \(48, 64\)"):
        load_hf(d)


def test_unexpected_tensor(saved, tmp_path):
    d = _copy(saved[("mixtral", "float32")][0], tmp_path / "m")
    _edit_weights(d, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32),
                                         "model.layers.0.mlp.extra.weight": np.ones((2, 2), np.float32)}))
    with pytest.raises(ValueError, match=r"does not use: 'model\.layers\.0\.mlp\.extra\.weight'$"):
        load_hf(d)


def test_unknown_architecture_and_missing_field(saved, tmp_path):
    d = _copy(saved[("mixtral", "float32")][0], tmp_path / "m")
    _edit_config(d, lambda c: c.update(model_type="llama"))
    with pytest.raises(ValueError, match=r"model_type='llama'.*'mixtral', 'qwen3_moe', 'qwen2_moe'"):
        load_hf(d)
    _edit_config(d, lambda c: (c.update(model_type="mixtral"), c.pop("hidden_size")))
    with pytest.raises(ValueError, match="'hidden_size'"):
        load_hf(d)


def test_missing_config_and_weights(saved, tmp_path):
    d = _copy(saved[("mixtral", "float32")][0], tmp_path / "m")
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(d)
    d2 = _copy(saved[("mixtral", "float32")][0], tmp_path / "m2")
    os.remove(os.path.join(d2, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf(d2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------ config

def _hf_dict(name):
    return _hf_config(name).to_dict()


def test_config_mapping():
    c = config_from_hf(_hf_dict("qwen2_moe"))
    assert c.layer_kinds() == ("dense", "moe", "dense", "dense")
    assert (c.moe_every, c.dense_layers, c.qkv_bias, c.qk_norm) == (2, (3,), True, False)
    m = c.moe
    assert (m.num_experts, m.d_ff, m.num_shared_experts, m.shared_d_ff, m.shared_expert_gate) == (4, 32, 1, 48, True)
    assert (m.router.type, m.router.top_k, m.router.normalize, m.dispatch) == ("topk", 2, False, "dropless")
    c = config_from_hf(_hf_dict("qwen3_moe"))
    assert (c.head_dim, c.qk_norm, c.tie_embeddings, c.moe.router.normalize, c.d_ff) == (24, True, True, True, 96)
    c = config_from_hf(_hf_dict("mixtral"))
    assert (c.rope_theta, c.norm_eps, c.moe.d_ff, c.moe.router.normalize, c.max_seq_len) == (1e6, 1e-5, 32, True, 256)
    # transformers-4 spellings: top-level rope_theta, rope_scaling null, Qwen3 num_experts.
    old = {"model_type": "qwen3_moe", "vocab_size": 10, "hidden_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 32,
           "moe_intermediate_size": 8, "num_experts": 4, "num_experts_per_tok": 2, "rope_theta": 5e5,
           "rope_scaling": None, "max_position_embeddings": 64, "sliding_window": 4096,
           "use_sliding_window": False}
    c = config_from_hf(old)
    assert (c.rope_theta, c.moe.num_experts, c.head_dim) == (5e5, 4, None)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}), "rope_type='yarn'"),
    (lambda c: c.update(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (lambda c: c.update(sliding_window=64), "sliding_window"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c.update(num_local_experts=None), "num_local_experts"),
])
def test_config_rejects_unsupported(edit, match):
    c = _hf_dict("mixtral")
    edit(c)
    with pytest.raises(ValueError, match=match):
        config_from_hf(c)
    # An inactive window (at least max_position_embeddings) is fine.
    c = _hf_dict("mixtral")
    c["sliding_window"] = c["max_position_embeddings"]
    config_from_hf(c)


def test_config_roundtrip_through_hf():
    for name in ("mixtral", "qwen3_moe", "qwen2_moe"):
        cfg = config_from_hf(_hf_dict(name))
        hf = config_to_hf(cfg)
        assert hf["model_type"] == name
        assert config_from_hf(hf) == cfg
        # and transformers accepts it
        tc = transformers.AutoConfig.for_model(**hf)
        assert tc.num_hidden_layers == cfg.n_layers


def test_qwen3_attention_bias_rejected():
    c = _hf_dict("qwen3_moe")
    c["attention_bias"] = True
    with pytest.raises(ValueError, match="attention_bias"):
        config_from_hf(c)


def test_dtype_argument(saved):
    with pytest.raises(ValueError, match="dtype"):
        load_hf(saved[("mixtral", "float32")][0], dtype="float16")

