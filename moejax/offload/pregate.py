"""Read-ME: refactor a dense model into a pre-gated MoE (arXiv 2410.19123).

1. **Domains** from the corpus: the stdlib's files grouped by area (:data:`DOMAINS`, by top-level package).
2. **Activation statistics**: for every layer, the mean |SwiGLU hidden activation| of each FFN neuron on each
   domain's tokens (:func:`neuron_importance`).
3. **Refactor** (:func:`refactor`): per layer, each domain keeps its top ``keep`` fraction of neurons; the
   neurons every domain keeps form a *shared expert*; expert ``d`` is domain ``d``'s remaining neurons. Widths
   differ, so experts (and the shared expert across layers) are zero-padded to a common width: a padded
   neuron has zero gate, up and down weights and contributes exactly 0. The dense FFN output equals
   ``shared(x) + expert_d(x)`` plus the contribution of the neurons domain ``d`` dropped.
4. **Pre-gating router** (:class:`PreGate`): a small 1-layer causal transformer over token ids (a window of the
   last ``window`` tokens) that picks one expert per token *for all layers*, before the model runs. Trained by
   distillation (:func:`distill_targets`, :func:`train_pregate`): the target of a token is the expert whose
   refactored FFNs best reproduce the dense model's FFN outputs, summed over layers.
5. Serving: the model runs with ``expert_ids`` from the pre-gate (:meth:`Transformer.__call__`'s
   ``expert_ids``), so every layer's experts are known once a token is known: all prompt tokens at prefill and
   each generated token one step ahead. :class:`PreGatedRunner` serves so with the experts in memory; the
   offload runner (:class:`moejax.offload.runtime.OffloadRunner` with ``pregate=``) also feeds that lookahead to
   the Belady and predictive cache policies.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moejax.config import MoEConfig, RouterConfig
from moejax.nn.attention import attend, attention_mask, rope_tables
from moejax.nn.experts import swiglu
from moejax.serve.runner import ModelRunner

# Top-level stdlib packages/modules by area; files matching none go to "other".
DOMAINS: dict[str, tuple[str, ...]] = {
    "net-web": ("email", "http", "urllib", "xml", "html", "xmlrpc", "wsgiref", "smtplib", "imaplib", "poplib",
                "ftplib", "socket", "ssl", "mailbox", "mimetypes", "ipaddress", "nntplib", "telnetlib",
                "socketserver", "cgi", "webbrowser"),
    "concurrency": ("asyncio", "concurrent", "multiprocessing", "threading", "subprocess", "signal",
                    "selectors", "sched", "queue", "_threading_local", "contextvars"),
    "files-os": ("os", "shutil", "pathlib", "tempfile", "glob", "posixpath", "ntpath", "zipfile", "tarfile",
                 "gzip", "lzma", "bz2", "zipimport", "importlib", "fileinput", "filecmp", "stat", "platform",
                 "sysconfig", "site", "pkgutil", "compileall", "py_compile", "modulefinder", "runpy"),
    "gui-tools": ("tkinter", "idlelib", "turtledemo", "turtle", "curses", "pydoc", "lib2to3", "ensurepip",
                  "venv", "distutils"),
    "dev-tools": ("unittest", "doctest", "pdb", "bdb", "pstats", "profile", "cProfile", "trace", "timeit",
                  "argparse", "optparse", "getopt", "logging", "traceback", "inspect", "dis", "ast", "tokenize",
                  "token", "symtable", "tabnanny", "code", "codeop", "warnings", "cmd"),
    "text-data": ("encodings", "pydoc_data", "re", "sre_compile", "sre_parse", "sre_constants", "difflib",
                  "textwrap", "string", "locale", "gettext", "codecs", "unicodedata", "stringprep", "json",
                  "csv", "configparser", "pickle", "pickletools", "shelve", "dbm", "plistlib", "base64",
                  "binascii", "quopri", "uu"),
    "numbers-types": ("_pydecimal", "decimal", "fractions", "numbers", "statistics", "random", "math",
                      "datetime", "calendar", "typing", "enum", "dataclasses", "collections", "functools",
                      "operator", "abc", "copy", "types", "heapq", "bisect", "_pyio", "io", "ctypes"),
}
DOMAIN_NAMES = (*DOMAINS, "other")


def domain_of(relpath: str) -> int:
    """Domain index of a corpus file (by its first path component, without ``.py``)."""
    top = relpath.replace("\\", "/").split("/")[0]
    top = top.removesuffix(".py")
    for i, pkgs in enumerate(DOMAINS.values()):
        if top in pkgs:
            return i
    return len(DOMAINS)


def corpus_domain_tokens(root: str | None = None, split: str = "train", *, val_percent: float = 5.0,
                         cache_dir: str | None = None) -> list[np.ndarray]:
    """Tokens of each domain (:data:`DOMAIN_NAMES` order) in a corpus split (default: the stdlib)."""
    from moejax.train.data import build_corpus, list_corpus, split_files, stdlib_root

    streams, _ = build_corpus(root, val_percent=val_percent, cache_dir=cache_dir)
    ts = streams[split]
    files = split_files(list_corpus(os.path.abspath(root or stdlib_root())), val_percent, split)
    toks, starts = np.asarray(ts.tokens), ts.starts
    if len(files) != len(starts):
        raise RuntimeError(f"corpus cache lists {len(starts)} documents but {len(files)} files")
    ends = np.append(starts[1:], len(toks))
    out: list[list[np.ndarray]] = [[] for _ in DOMAIN_NAMES]
    for rel, a, b in zip(files, starts, ends):
        out[domain_of(rel)].append(toks[a:b])
    return [np.concatenate(x) if x else np.zeros(0, np.uint16) for x in out]


# ------------------------------------------------------------------------------------------------ dense model
def _layer_params(model):
    """Per-layer (attention block module, FFN weights) of a dense :class:`Transformer`."""
    out = []
    for r, (kind, _, n) in enumerate(model.runs):
        if kind != "dense":
            raise ValueError("Read-ME refactors a dense model (every layer a dense FFN); got MoE layers")
        gd, st = nnx.split(model.stacks[r])
        for li in range(n):
            out.append(nnx.merge(gd, jax.tree.map(lambda a, li=li: a[li], st)))
    return out


@nnx.jit
def _ffn_io(model, tokens):
    """FFN inputs ``y [L, B, S, D]``, hidden activations ``h [L, B, S, F]`` and outputs ``f [L, B, S, D]``."""
    B, S = tokens.shape
    x = jnp.take(model.embed[...], tokens, axis=0).astype(jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(S), (B, S))
    rope = rope_tables(pos, model.cfg.resolved_head_dim, model.cfg.rope_theta)
    mask = attention_mask(B, S)
    ys, hs, fs = [], [], []
    for blk in _layer_params(model):
        q, k, v = blk.attn.qkv(blk.attn_norm(x), pos, rope)
        x = x + blk.attn.out(attend(q, k, v, mask)).astype(x.dtype)
        y = blk.ffn_norm(x)
        wg, wu, wd = blk.mlp.w_gate[...], blk.mlp.w_up[...], blk.mlp.w_down[...]
        h = jax.nn.silu(y @ wg) * (y @ wu)
        f = h @ wd
        x = x + f
        ys.append(y)
        hs.append(h)
        fs.append(f)
    return jnp.stack(ys), jnp.stack(hs), jnp.stack(fs)


def _windows(tokens: np.ndarray, seq: int, max_windows: int, rng) -> np.ndarray:
    n = len(tokens) // seq
    if n == 0:
        raise ValueError(f"a domain has {len(tokens)} tokens, fewer than one sequence of {seq}")
    idx = rng.choice(n, size=min(n, max_windows), replace=False)
    return np.stack([tokens[i * seq:(i + 1) * seq] for i in sorted(idx)]).astype(np.int32)


def neuron_importance(model, per_domain: list[np.ndarray], *, seq: int = 256, windows: int = 16,
                      seed: int = 0) -> np.ndarray:
    """Mean |hidden activation| per (domain, layer, neuron): ``[n_domains, L, F]``."""
    rng = np.random.default_rng(seed)
    out = []
    for toks in per_domain:
        w = _windows(toks, seq, windows, rng)
        _, h, _ = _ffn_io(model, jnp.asarray(w))
        out.append(np.asarray(jnp.mean(jnp.abs(h), axis=(1, 2))))
    return np.stack(out)


@dataclasses.dataclass
class RefactorInfo:
    keep: float
    expert_width: int
    shared_width: int
    shared_per_layer: list[int]
    expert_neurons: list[list[int]]     # [L][E] kept neurons (before padding)


def refactor(model, importance: np.ndarray, *, keep: float = 0.5):
    """A pre-gated MoE :class:`Transformer` (one expert per domain + a shared expert) from a dense model."""
    from moejax.models.transformer import Transformer

    if not 0 < keep <= 1:
        raise ValueError(f"keep={keep} must be in (0, 1]")
    cfg = model.cfg
    E, L, F = importance.shape
    if L != cfg.n_layers or F != cfg.d_ff:
        raise ValueError(f"importance shape {importance.shape} does not match the model (L={cfg.n_layers}, "
                         f"d_ff={cfg.d_ff})")
    k = max(1, round(keep * F))
    sets = [[set(np.argsort(-importance[d, layer])[:k].tolist()) for d in range(E)] for layer in range(L)]
    shared = [sorted(set.intersection(*s)) for s in sets]
    experts = [[sorted(s[d] - set(sh)) for d in range(E)] for s, sh in zip(sets, shared)]
    width = max(1, max(len(e) for layer in experts for e in layer))
    swidth = max(1, max(len(s) for s in shared))
    mcfg = dataclasses.replace(
        cfg, dense_layers=(), moe_every=1,
        moe=MoEConfig(num_experts=E, d_ff=width, num_shared_experts=1, shared_d_ff=swidth, grouped_impl="auto",
                      router=RouterConfig(type="topk", top_k=1, normalize=True))).validate()
    moe = Transformer(mcfg, rngs=nnx.Rngs(0))
    dense_layers = _layer_params(model)
    _, dstate = nnx.split(model)
    gdef, mstate = nnx.split(moe)
    flat = dict(nnx.to_flat_state(mstate))
    dflat = dict(nnx.to_flat_state(dstate))

    def set_(path, value):
        flat[path] = flat[path].replace(jnp.asarray(value, flat[path][...].dtype))

    # everything but the FFNs is copied (same paths: embeddings, attention, norms, head)
    for path, var in dflat.items():
        if "mlp" not in path and path in flat:
            set_(path, var[...])
    D = cfg.d_model
    wg = np.zeros((L, E, D, width), np.float32)
    wu = np.zeros((L, E, D, width), np.float32)
    wd = np.zeros((L, E, width, D), np.float32)
    sg = np.zeros((L, D, swidth), np.float32)
    su = np.zeros((L, D, swidth), np.float32)
    sd = np.zeros((L, swidth, D), np.float32)
    for layer, blk in enumerate(dense_layers):
        g, u, dn = (np.asarray(blk.mlp.w_gate[...]), np.asarray(blk.mlp.w_up[...]), np.asarray(blk.mlp.w_down[...]))
        sh = shared[layer]
        sg[layer, :, :len(sh)], su[layer, :, :len(sh)], sd[layer, :len(sh)] = g[:, sh], u[:, sh], dn[sh]
        for d in range(E):
            idx = experts[layer][d]
            wg[layer, d, :, :len(idx)], wu[layer, d, :, :len(idx)], wd[layer, d, :len(idx)] = (
                g[:, idx], u[:, idx], dn[idx])
    set_(("stacks", 0, "moe", "experts", "w_gate"), wg)
    set_(("stacks", 0, "moe", "experts", "w_up"), wu)
    set_(("stacks", 0, "moe", "experts", "w_down"), wd)
    set_(("stacks", 0, "moe", "shared", "w_gate"), sg)
    set_(("stacks", 0, "moe", "shared", "w_up"), su)
    set_(("stacks", 0, "moe", "shared", "w_down"), sd)
    # the in-model router is unused with pre-gated routing; zero it so it cannot matter silently
    set_(("stacks", 0, "moe", "router", "w"), np.zeros(flat[("stacks", 0, "moe", "router", "w")][...].shape))
    moe = nnx.merge(gdef, nnx.from_flat_state(list(flat.items())))
    info = RefactorInfo(keep, width, swidth, [len(s) for s in shared],
                        [[len(e) for e in layer] for layer in experts])
    return moe, info


def distill_targets(dense, moe, tokens: np.ndarray) -> np.ndarray:
    """Per-token expert whose refactored FFNs best reproduce the dense FFN outputs (summed over layers).

    Uses the dense model's FFN inputs at every layer (teacher forcing), so targets do not depend on earlier
    routing choices. ``tokens [B, S]`` -> ``[B, S]`` int32.
    """
    y, _, f = _ffn_io(dense, jnp.asarray(tokens))
    return np.asarray(_best_expert(moe, y, f))


@nnx.jit
def _best_expert(moe, y, f):
    gd, st = nnx.split(moe.stacks[0])
    err = 0.0
    L = y.shape[0]
    for layer in range(L):
        blk = nnx.merge(gd, jax.tree.map(lambda a, i=layer: a[i], st))
        wg, wu, wd = blk.moe.experts.weights()
        shared = blk.moe.shared(y[layer])                                           # [B, S, D]
        outs = jax.vmap(lambda g, u, d, yl=y[layer]: swiglu(yl, g, u, d))(wg, wu, wd)  # [E, B, S, D]
        err = err + jnp.sum((shared[None] + outs - f[layer][None]) ** 2, axis=-1)   # [E, B, S]
    return jnp.argmin(err, axis=0).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------ pre-gate
class PreGate(nnx.Module):
    """1-layer causal transformer over token ids (window ``window``) -> expert logits per token."""

    def __init__(self, vocab: int, num_experts: int, *, d: int = 64, heads: int = 4, window: int = 32,
                 rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=0.02)
        self.window, self.heads, self.num_experts = window, heads, num_experts
        self.embed = nnx.Param(init(rngs.params(), (vocab, d)))
        self.pos = nnx.Param(init(rngs.params(), (window, d)))
        self.wqkv = nnx.Param(init(rngs.params(), (d, 3, heads, d // heads)))
        self.wo = nnx.Param(init(rngs.params(), (heads, d // heads, d)))
        self.w1 = nnx.Param(init(rngs.params(), (d, 4 * d)))
        self.w2 = nnx.Param(init(rngs.params(), (4 * d, d)))
        self.out = nnx.Param(init(rngs.params(), (d, num_experts)))

    def __call__(self, windows):
        """``windows [N, W]`` token ids (the last column is the token to route; -1 = before the start) ->
        logits ``[N, E]``."""
        N, W = windows.shape
        valid = windows >= 0
        x = jnp.take(self.embed[...], jnp.maximum(windows, 0), axis=0) + self.pos[...][-W:]
        qkv = jnp.einsum("nwd,dthk->nwthk", x, self.wqkv[...])
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        mask = jnp.broadcast_to(valid[:, None, :], (N, W, W)) & jnp.tril(jnp.ones((W, W), bool))[None]
        a = attend(q, k, v, mask)
        x = x + jnp.einsum("nwhk,hkd->nwd", a, self.wo[...])
        last = x[:, -1]
        last = last + jax.nn.gelu(last @ self.w1[...]) @ self.w2[...]
        return last @ self.out[...]


def make_windows(tokens: np.ndarray, window: int) -> np.ndarray:
    """``[B, S]`` -> ``[B * S, window]``: for each position, the ``window`` tokens ending there (-1 padded)."""
    B, S = tokens.shape
    pad = np.full((B, window - 1), -1, np.int32)
    t = np.concatenate([pad, tokens.astype(np.int32)], axis=1)
    idx = np.arange(S)[:, None] + np.arange(window)[None, :]
    return t[:, idx].reshape(B * S, window)


def train_pregate(gate: PreGate, tokens: np.ndarray, targets: np.ndarray, *, steps: int = 300, batch: int = 512,
                  lr: float = 3e-3, seed: int = 0, progress: bool = False) -> dict:
    """Distill the pre-gate on (token windows, target experts); returns train/held-out accuracy."""
    W = gate.window
    X = make_windows(tokens, W)
    Y = targets.reshape(-1).astype(np.int32)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(X))
    n_val = max(1, len(X) // 10)
    val, tr = perm[:n_val], perm[n_val:]
    opt = nnx.Optimizer(gate, optax.adamw(lr, weight_decay=0.01), wrt=nnx.Param)

    @nnx.jit
    def step(gate, opt, x, y):
        def loss_fn(g):
            return optax.softmax_cross_entropy_with_integer_labels(g(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(gate)
        opt.update(gate, grads)
        return loss

    it = range(steps)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="pre-gate distillation")
    losses = []
    for _ in it:
        b = rng.choice(tr, size=min(batch, len(tr)), replace=False)
        losses.append(float(step(gate, opt, jnp.asarray(X[b]), jnp.asarray(Y[b]))))

    def acc(idx):
        pred = np.concatenate([np.asarray(jnp.argmax(gate(jnp.asarray(X[idx[i:i + 4096]])), -1))
                               for i in range(0, len(idx), 4096)])
        return float(np.mean(pred == Y[idx]))

    majority = float(np.max(np.bincount(Y[val], minlength=gate.num_experts)) / len(val))
    return {"train_accuracy": acc(tr[:8192]), "val_accuracy": acc(val), "majority_baseline": majority,
            "final_loss": float(np.mean(losses[-20:]))}


@nnx.jit
def pregate_ids(gate: PreGate, windows):
    """Expert per window (argmax of the pre-gate)."""
    return jnp.argmax(gate(windows), axis=-1).astype(jnp.int32)


def route_tokens(gate: PreGate, tokens: np.ndarray) -> np.ndarray:
    """Expert ids ``[B, S]`` for token ids ``[B, S]`` (each position sees only itself and earlier tokens)."""
    B, S = tokens.shape
    return np.asarray(pregate_ids(gate, jnp.asarray(make_windows(tokens, gate.window)))).reshape(B, S)


# ------------------------------------------------------------------------------------------------ serving
def plan_expert_ids(gate: PreGate, plan, dec, pf):
    """Pre-gated experts of a packed serving step: ``dec_ids [Bd]`` for the decode rows (the token each row
    computes) and ``pf_ids [Bp, Tp]`` for the left-padded prefill rows (numpy; None for an absent part), from
    each token's window of the request's preceding tokens."""
    W = gate.window
    dec_ids = pf_ids = None
    if dec is not None:
        win = np.full((len(dec.tokens), W), -1, np.int32)
        for i, r in enumerate(plan.decode):
            t = r.tokens[-W:]
            win[i, W - len(t):] = t
        dec_ids = np.asarray(pregate_ids(gate, win))
    if pf is not None:
        Bp, Tp = pf.tokens.shape
        win = np.full((Bp, Tp, W), -1, np.int32)
        for i, c in enumerate(plan.prefill):
            toks = np.asarray(c.request.tokens[:c.start + c.length], np.int32)
            pad = Tp - c.length
            for j in range(c.length):
                p = c.start + j
                t = toks[max(0, p - W + 1):p + 1]
                win[i, pad + j, W - len(t):] = t
        pf_ids = np.asarray(pregate_ids(gate, win.reshape(Bp * Tp, W))).reshape(Bp, Tp)
    return dec_ids, pf_ids


class PreGatedRunner(ModelRunner):
    """Serving with Read-ME's pre-gating router, experts in memory: every MoE layer uses the experts ``gate``
    picks from the token ids, known before the step runs. ``Engine(model, runner=PreGatedRunner(model, cfg,
    gate))``. Multi-step decoding is off (each step's ids need the tokens the previous one sampled)."""

    supports_multi_step = False
    supports_speculative = False
    supports_async = False  # the pre-gate routes from the tokens on the host

    def __init__(self, model, cfg, gate: PreGate):
        super().__init__(model, cfg)
        self.gate = gate

    def expert_ids(self, plan, dec, pf):
        return plan_expert_ids(self.gate, plan, dec, pf)

    def blank_expert_ids(self, dec, pf):
        return (None if dec is None else np.zeros(dec.tokens.shape[0], np.int32),
                None if pf is None else np.zeros(pf.tokens.shape, np.int32))
