"""Results files say only what their run computed: a report rendered from measurements and again from every
measurement perturbed keeps no figure in place but the fixed inputs (cited paper numbers, the policy's
documented parameters)."""

from __future__ import annotations

import re
import types

import numpy as np

from experiments import expert_offload as eo

FIGURE = re.compile(r"[-+]?\d+\.\d+")   # a measured figure (printed with decimals)
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _measurements(seed: int) -> dict:
    """A results dict of the shape :func:`experiments.expert_offload.readme_part` builds, random values."""
    rng = np.random.default_rng(seed)
    E, Lm = 8, 4
    rate = lambda: float(rng.uniform(0.05, 0.95))
    policies = ("random", "lru", "belady", "predictive")
    so_cols = ["random", "lru", "belady", "predictive (fixed model)", "predictive", "belady (whole future)"]
    concurrent = {f"{c}-{p}": {"hit_rate": rate()} for c in (2, 4, 5, 6) for p in policies}
    return {
        "run": "runs/x", "E": E, "Lm": Lm,
        "info": types.SimpleNamespace(expert_width=int(rng.integers(10, 99)), shared_per_layer=int(rng.integers(10, 99))),
        "gstats": {"val_accuracy": rate(), "majority_baseline": rate()},
        "quality": {k: float(rng.uniform(1, 3)) for k in ("dense_bits_per_byte", "refactored_pregated_bits_per_byte",
                                                          "oracle_routed_bits_per_byte")},
        "store": types.SimpleNamespace(record_bytes=int(rng.integers(2 ** 18, 2 ** 22))),
        "rows": [{"cache": "2 of 8", "hit rate %": 100 * rate()}],
        "results": {"2-lru-direct": {"hits": int(rng.integers(500, 900)), "misses": int(rng.integers(300, 500))}},
        "offline": {c: {p: rate() for p in ("random", "lru", "lfu", "belady")} for c in (2, 4)},
        "served_order": {c: {p: rate() for p in so_cols} for c in (2, 4, 5, 6)},
        "concurrent": concurrent, "crows": [{"cache": "2 of 8", "lru": 100 * rate()}],
        "gain2": 100 * rate(), "gain2p": 100 * rate(), "cgain": {2: 100 * rate()}, "cgain_p": 100 * rate(),
    }


def _perturbed(x):
    """Every measured number changed (by about 7%), the structure kept."""
    if isinstance(x, dict):
        return {k: _perturbed(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_perturbed(v) for v in x]
    if isinstance(x, types.SimpleNamespace):
        return types.SimpleNamespace(**_perturbed(vars(x)))
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return x
    return x * 1.07 if isinstance(x, float) else int(x * 1.07) + 3


def test_expert_offload_report_has_no_figure_its_run_did_not_compute():
    from moejax.offload.runtime import OffloadConfig

    args = types.SimpleNamespace(prompts=6, prompt_len=128, new_tokens=48)
    r = _measurements(1)
    r2 = {**_perturbed({k: v for k, v in r.items() if k not in ("E", "Lm")}), "E": r["E"], "Lm": r["Lm"]}
    a, b = (eo.readme_markdown(args, m) for m in (r, r2))
    assert NUMBER.sub("#", a) == NUMBER.sub("#", b)  # the same text around the numbers
    fixed = {float(v) for cache in eo.PAPER.values() for v in cache.values()} | {OffloadConfig.discount}
    same = [x for x, y in zip(FIGURE.findall(a), FIGURE.findall(b), strict=True) if x == y and float(x) not in fixed]
    assert not same, f"figures that do not depend on the measurements: {same}"
