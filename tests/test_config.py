"""Config validation (errors name the bad field) and JSON/YAML round trips."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from moejax.config import (PRESETS, ModelConfig, MoEConfig, RouterConfig, config_from_dict, config_to_dict,
                           get_preset, load_config, save_config)


def _raises_naming(field: str, fn):
    with pytest.raises(ValueError, match=re.escape(field)):
        fn()


# ------------------------------------------------------------------------------------------- validation

ROUTER_BAD = [
    ("type", "softmax"), ("top_k", 0), ("top_k", 1.5), ("top_k", True), ("group_size", 0), ("group_size", -4),
    ("jitter", -0.1), ("jitter", 1.0), ("jitter", "x"), ("second_policy", "greedy"), ("scaling_factor", 0.0),
    ("scaling_factor", -1.0), ("n_groups", 0), ("topk_groups", 0), ("bias_update_rate", -1e-3),
    ("xmoe_dim", 0), ("xmoe_init_temperature", 0.0),
]


@pytest.mark.parametrize("field,value", ROUTER_BAD)
def test_router_config_bad_values(field, value):
    rc = dataclasses.replace(RouterConfig(), **{field: value})
    _raises_naming(f"RouterConfig.{field}", rc.validate)
    # Nested configs are validated by their parents, with the same message.
    _raises_naming(f"RouterConfig.{field}", MoEConfig(num_experts=8, router=rc).validate)
    _raises_naming(f"RouterConfig.{field}", ModelConfig(moe=MoEConfig(num_experts=8, router=rc)).validate)


def test_router_config_cross_field_checks():
    _raises_naming("RouterConfig.top_k", lambda: RouterConfig(top_k=5).validate(num_experts=4))
    _raises_naming("RouterConfig.top_k", lambda: RouterConfig(type="gshard").validate(num_experts=1))
    RouterConfig(type="switch", top_k=5).validate(num_experts=2)  # switch forces top-1
    RouterConfig(type="expert_choice", top_k=16).validate(num_experts=4)  # top_k is ignored by EC
    _raises_naming("RouterConfig.topk_groups", RouterConfig(n_groups=2, topk_groups=3).validate)
    _raises_naming("RouterConfig.n_groups", lambda: RouterConfig(n_groups=3).validate(num_experts=8))
    _raises_naming("RouterConfig.topk_groups",
                   lambda: RouterConfig(type="sigmoid", top_k=4, n_groups=4, topk_groups=1).validate(8))
    RouterConfig(type="sigmoid", top_k=4, n_groups=4, topk_groups=2).validate(8)


MOE_BAD = [
    ("num_experts", 0), ("d_ff", 0), ("dispatch", "sparse"), ("capacity_factor", "1.0"),
    ("capacity_factor", None), ("num_shared_experts", -1), ("shared_d_ff", 0), ("shared_expert_gate", True),
    ("aux_loss_coef", -0.1), ("z_loss_coef", -1.0), ("grouped_impl", "megablox"), ("block_rows", 0),
    ("router", "topk"),
]


@pytest.mark.parametrize("field,value", MOE_BAD)
def test_moe_config_bad_values(field, value):
    cfg = dataclasses.replace(MoEConfig(), **{field: value})
    _raises_naming(f"MoEConfig.{field}", cfg.validate)
    _raises_naming(f"MoEConfig.{field}", ModelConfig(moe=cfg).validate)


def test_expert_choice_needs_capacity_dispatch():
    ec = RouterConfig(type="expert_choice")
    _raises_naming("MoEConfig.dispatch", MoEConfig(router=ec, dispatch="dropless").validate)
    MoEConfig(router=ec, dispatch="capacity").validate()
    from flax import nnx

    from moejax.nn.moe import MoE
    with pytest.raises(ValueError, match=re.escape("MoEConfig.dispatch")):
        MoE(16, MoEConfig(num_experts=4, d_ff=8, router=ec, dispatch="dropless"), rngs=nnx.Rngs(0))


def test_moe_config_good_values():
    for cf in (1.25, 1, 0, 0.0, -1.0):
        MoEConfig(dispatch="capacity", capacity_factor=cf).validate()
    MoEConfig(num_shared_experts=2, shared_d_ff=64, shared_expert_gate=True, block_rows=1).validate()


MODEL_BAD = [
    ("vocab_size", 0), ("d_model", 0), ("n_layers", 0), ("n_heads", 0), ("n_kv_heads", 0), ("n_kv_heads", 3),
    ("d_ff", 0), ("max_seq_len", 0), ("moe_every", 0), ("head_dim", 0), ("head_dim", 7), ("rope_theta", 0.0),
    ("norm_eps", 0.0), ("init_std", -0.02), ("dtype", "float16"), ("param_dtype", "int8"),
    ("dense_layers", (0, 4)), ("dense_layers", (-1,)), ("moe", "mixtral"), ("vocab_size", 2.0),
]


@pytest.mark.parametrize("field,value", MODEL_BAD)
def test_model_config_bad_values(field, value):
    cfg = dataclasses.replace(ModelConfig(), **{field: value})
    _raises_naming(f"ModelConfig.{field}", cfg.validate)


def test_model_config_head_dim_must_be_explicit_when_not_divisible():
    _raises_naming("ModelConfig.head_dim", ModelConfig(d_model=100, n_heads=8).validate)
    ModelConfig(d_model=100, n_heads=8, n_kv_heads=2, head_dim=16).validate()
    ModelConfig(moe=None).validate()


def test_presets_validate():
    for name in PRESETS:
        assert get_preset(name) == PRESETS[name]
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("gpt-5")


# ------------------------------------------------------------------------------------------ round trips

CUSTOM = ModelConfig(
    vocab_size=1000, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, dense_layers=(0, 2),
    qk_norm=True, dtype="bfloat16",
    moe=MoEConfig(num_experts=6, d_ff=48, dispatch="capacity", capacity_factor=-1.5, num_shared_experts=2,
                  shared_d_ff=24, shared_expert_gate=True, block_rows=4,
                  router=RouterConfig(type="sigmoid", top_k=2, group_size=128, n_groups=3, topk_groups=2,
                                      scaling_factor=2.5)))


@pytest.mark.parametrize("ext", ["json", "yaml", "yml"])
@pytest.mark.parametrize("cfg", [CUSTOM, PRESETS["tiny"], PRESETS["qwen2-moe-a2.7b"], PRESETS["tiny-dense"]],
                         ids=["custom", "tiny", "qwen2-moe", "dense"])
def test_save_load_round_trip(tmp_path, ext, cfg):
    path = tmp_path / f"cfg.{ext}"
    save_config(cfg, path)
    loaded = load_config(path)
    assert loaded == cfg
    assert isinstance(loaded.dense_layers, tuple)
    if cfg.moe is not None:
        assert isinstance(loaded.moe, MoEConfig) and isinstance(loaded.moe.router, RouterConfig)
    # Nested configs round-trip on their own too.
    if cfg.moe is not None:
        p2 = tmp_path / f"moe.{ext}"
        save_config(cfg.moe, p2)
        assert load_config(p2, MoEConfig) == cfg.moe


def test_json_is_plain(tmp_path):
    path = tmp_path / "c.json"
    save_config(CUSTOM, path)
    data = json.loads(path.read_text())
    assert data["moe"]["router"]["type"] == "sigmoid"
    assert data["dense_layers"] == [0, 2]
    assert config_from_dict(ModelConfig, config_to_dict(CUSTOM)) == CUSTOM


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="extension"):
        save_config(CUSTOM, tmp_path / "c.txt")
    # Unknown keys are an error that lists the allowed fields.
    data = config_to_dict(CUSTOM)
    data["moe"]["router"]["topk"] = 3
    (tmp_path / "u.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown field"):
        load_config(tmp_path / "u.json")
    # Loading validates: an invalid value written by hand is reported by field name.
    data = config_to_dict(CUSTOM)
    data["moe"]["dispatch"] = "dropfull"
    import yaml
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=re.escape("MoEConfig.dispatch")):
        load_config(tmp_path / "bad.yaml")


def test_hand_written_yaml_reads_exponent_floats(tmp_path):
    """PyYAML's safe loader reads '1e-6' as a string; load_config reads it as the float users mean."""
    (tmp_path / "m.yaml").write_text("norm_eps: 1e-6\nrope_theta: 1e4\nmoe: null\n")
    cfg = load_config(tmp_path / "m.yaml")
    assert cfg.norm_eps == 1e-6 and cfg.rope_theta == 1e4 and cfg.moe is None
