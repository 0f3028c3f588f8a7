"""Byte-level corpora, packing and a deterministic, resumable, rank-sharded batch iterator.

Tokens are bytes (0..255) plus specials (``EOS = 256`` ends every document, ``PAD = 257``). A corpus is a list of
text files; the default is the Python standard library's own ``.py`` sources (on every machine; site-packages and
test folders excluded). Files go to train or validation by a hash of their path relative to the corpus root, so
the split is stable as files come and go; a hash of the corpus contents (each file's relative path and bytes, in
sorted order) is recorded with every run because standard libraries differ between Python builds: evaluation
and resume check it (:func:`corpus_mismatch`).

Each split is tokenized once into a cache directory as a numpy memmap of ``uint16`` tokens plus document start
offsets, with the content hash in its metadata (written atomically; keyed by the files' paths, sizes and
modification times, so an edited file rebuilds the cache), then cut into fixed-length sequences. A sequence may
hold several documents and a document may continue into the next sequence; ``segment_ids`` number the document
pieces within a sequence (attention stays inside a piece) and ``positions`` restart at each piece.

:class:`BatchIterator` yields global batch ``step``'s rows ``[rank * B/n, (rank+1) * B/n)``: the global batch
does not depend on how many processes read it. Its state (epoch, step) is a small dict saved with checkpoints;
order within an epoch is a permutation seeded by ``(seed, epoch)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import tempfile
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from moejax.config import BYTE_VOCAB, EOS, PAD  # noqa: F401  (the byte-level vocabulary; also as moejax.train.data.*)

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_corpus(root: str, suffixes: Sequence[str] = (".py",)) -> list[str]:
    """Sorted relative paths of the corpus files under ``root`` (test folders and site-packages excluded)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"corpus path {root!r} is not a directory")
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _EXCLUDED_DIRS and not d.startswith("test_"))
        for f in files:
            if f.endswith(tuple(suffixes)):
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    out.sort()
    if not out:
        raise FileNotFoundError(f"corpus path {root!r} holds no files ending in {tuple(suffixes)}")
    return out


def is_validation(relpath: str, val_percent: float) -> bool:
    """Deterministic split by a hash of the relative path."""
    h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "little")
    return (h % 10000) < val_percent * 100


def split_files(files: Sequence[str], val_percent: float, split: str) -> list[str]:
    """The files of ``split`` ("train" or "validation"), in corpus order; a one-file corpus is in both."""
    if len(files) <= 1:
        return list(files)
    return [f for f in files if is_validation(f, val_percent) == (split == "validation")]


def file_list_hash(files: Sequence[str]) -> str:
    """A hash of the sorted relative paths only (contents not included; see :func:`content_hash`)."""
    return hashlib.sha256("\n".join(files).encode()).hexdigest()[:16]


def content_hash(file_digests: dict) -> str:
    """The corpus content hash from ``{relative path: blake2b digest of the file's bytes}``: blake2b over each
    file's relative path and digest in sorted path order (16 hex digits). :func:`build_corpus` computes it while
    tokenizing (the files are read once) and keeps it in the cache's metadata."""
    h = hashlib.blake2b(digest_size=8)
    for rel in sorted(file_digests):
        h.update(rel.encode() + b"\0" + file_digests[rel])
    return h.hexdigest()


def _stat_key(base: str, files: Sequence[str]) -> str:
    """A cheap fingerprint (path, size, mtime) of the files, for the cache key: an edited file is re-read."""
    h = hashlib.sha256()
    for rel in files:
        st = os.stat(os.path.join(base, rel))
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CorpusInfo:
    """What a run records about its corpus (``to_dict()`` goes into checkpoint metadata and the log header).

    Attributes:
      root: absolute path of the corpus directory (or file).
      files_hash: hash of the sorted relative file paths (:func:`file_list_hash`).
      n_files, n_tokens: per split.
      content_hash: hash of every file's relative path and bytes (:func:`content_hash`); identifies the corpus.
    """

    root: str
    files_hash: str
    n_files: dict
    n_tokens: dict
    content_hash: str = ""

    def to_dict(self) -> dict:
        return {"root": self.root, "files_hash": self.files_hash, "content_hash": self.content_hash,
                "n_files": self.n_files, "n_tokens": self.n_tokens}


def corpus_mismatch(recorded: dict | None, info: CorpusInfo) -> str | None:
    """``None`` when ``info`` is the corpus that ``recorded`` (a :meth:`CorpusInfo.to_dict` from a checkpoint or
    a log) describes; otherwise why not, naming both hashes. A record written before content hashes existed
    (``files_hash`` only) is compared by its file list, with a warning that the contents are not verified."""
    here = f"this corpus {info.root!r} has content hash {info.content_hash}"
    if not recorded:
        return f"no corpus is recorded (content hash: none); {here}"
    rec = f"the recorded corpus {recorded.get('root')!r}"
    if recorded.get("content_hash"):
        if recorded["content_hash"] == info.content_hash:
            return None
        return f"{rec} has content hash {recorded['content_hash']}; {here}"
    if recorded.get("files_hash") == info.files_hash:
        import warnings
        warnings.warn(f"{rec} was recorded before corpus content hashes (file-list hash {info.files_hash} only): "
                      "its file list matches, its contents are not verified", stacklevel=2)
        return None
    return (f"{rec} has content hash: none recorded (file-list hash {recorded.get('files_hash')}); {here} "
            f"(file-list hash {info.files_hash})")


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "moejax", "data")


def build_corpus(root: str | None = None, *, val_percent: float = 5.0, cache_dir: str | None = None,
                 suffixes: Sequence[str] = (".py",)) -> tuple[dict, CorpusInfo]:
    """Tokenize a corpus (default: the stdlib) into cached memmaps; returns ``({split: TokenStream}, info)``."""
    root = os.path.abspath(root or stdlib_root())
    if os.path.isfile(root):
        files, base = [os.path.basename(root)], os.path.dirname(root)
    else:
        files, base = list_corpus(root, suffixes), root
    fh = file_list_hash(files)
    key = hashlib.sha256(f"{root}|{fh}|{_stat_key(base, files)}|{val_percent}".encode()).hexdigest()[:16]
    out = os.path.join(cache_dir or default_cache_dir(), key)
    if not os.path.exists(os.path.join(out, "meta.json")):
        _write_cache(out, base, files, val_percent)
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    streams = {s: TokenStream(os.path.join(out, s)) for s in ("train", "validation")}
    info = CorpusInfo(root, fh, meta["n_files"], {s: len(t) for s, t in streams.items()}, meta["content_hash"])
    if info.n_tokens["train"] == 0 or info.n_tokens["validation"] == 0:
        raise ValueError(f"corpus {root!r}: a split is empty ({info.n_files}); use more files or another "
                         f"val_percent (now {val_percent})")
    return streams, info


def _write_cache(out: str, base: str, files: Sequence[str], val_percent: float) -> None:
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    n_files, digests = {}, {}
    for split in ("train", "validation"):
        chosen = split_files(files, val_percent, split)
        n_files[split] = len(chosen)
        chunks, starts, n = [], [], 0
        for rel in chosen:
            with open(os.path.join(base, rel), "rb") as fh:
                raw = fh.read()
            digests[rel] = hashlib.blake2b(raw).digest()
            data = np.frombuffer(raw, np.uint8).astype(np.uint16)
            starts.append(n)
            chunks.append(data)
            chunks.append(np.array([EOS], np.uint16))
            n += len(data) + 1
        toks = np.concatenate(chunks) if chunks else np.zeros(0, np.uint16)
        d = os.path.join(tmp, split)
        os.makedirs(d)
        toks.tofile(os.path.join(d, "tokens.u16"))
        np.asarray(starts, np.int64).tofile(os.path.join(d, "starts.i64"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"files": list(files), "n_files": n_files, "val_percent": val_percent,
                   "content_hash": content_hash(digests)}, f)
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race: keep theirs
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


class TokenStream:
    """A memory-mapped token stream with document start offsets."""

    def __init__(self, path: str):
        self.tokens = np.memmap(os.path.join(path, "tokens.u16"), np.uint16, "r") \
            if os.path.getsize(os.path.join(path, "tokens.u16")) else np.zeros(0, np.uint16)
        self.starts = np.fromfile(os.path.join(path, "starts.i64"), np.int64)

    def __len__(self) -> int:
        return len(self.tokens)

    def num_sequences(self, seq_len: int) -> int:
        return len(self.tokens) // seq_len

    def sequence(self, i: int, seq_len: int) -> dict:
        """Sequence ``i``: tokens, segment ids (1-based pieces) and positions (restarting per piece)."""
        lo = i * seq_len
        tok = np.asarray(self.tokens[lo:lo + seq_len], np.int32)
        # Piece starts inside this window: the window start and every document start within it.
        inside = self.starts[(self.starts > lo) & (self.starts < lo + seq_len)] - lo
        seg = np.ones(seq_len, np.int32)
        seg[inside] += 1
        seg = np.cumsum(seg) - np.arange(seq_len)  # 1 + number of piece starts at or before each index
        piece_start = np.zeros(seq_len, np.int64)
        piece_start[inside] = inside
        piece_start = np.maximum.accumulate(piece_start)
        return {"tokens": tok, "segment_ids": seg.astype(np.int32),
                "positions": (np.arange(seq_len) - piece_start).astype(np.int32)}


class BatchIterator:
    """Deterministic, resumable batches ``{"tokens", "segment_ids", "positions"}: [B_local, seq_len]``.

    Batches are built for next-token prediction by the trainer (inputs ``tokens[:, :-1]``, targets
    ``tokens[:, 1:]``), so ``seq_len`` here is the model context + 1.
    """

    def __init__(self, stream: TokenStream, *, seq_len: int, global_batch: int, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, num_ranks: int = 1):
        if global_batch % num_ranks:
            raise ValueError(f"global batch {global_batch} is not divisible by the {num_ranks} data-parallel ranks")
        self.stream, self.seq_len, self.global_batch = stream, seq_len, global_batch
        self.seed, self.shuffle, self.rank, self.num_ranks = seed, shuffle, rank, num_ranks
        self.n_seq = stream.num_sequences(seq_len)
        if self.n_seq < global_batch:
            raise ValueError(f"the split holds {self.n_seq} sequences of {seq_len} tokens, fewer than one global "
                             f"batch of {global_batch}")
        self.steps_per_epoch = self.n_seq // global_batch
        self.epoch, self.step = 0, 0
        self._perm_epoch, self._perm = None, None

    def state(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.global_batch}

    def restore(self, state: dict) -> None:
        for k in ("seed", "seq_len", "global_batch"):
            if state.get(k) != getattr(self, k):
                raise ValueError(f"data iterator state has {k}={state.get(k)!r}, this run uses {getattr(self, k)!r}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def _order(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n_seq)
                          if self.shuffle else np.arange(self.n_seq))
            self._perm_epoch = self.epoch
        return self._perm

    def global_indices(self) -> np.ndarray:
        """Sequence indices of the current global batch."""
        b = self.global_batch
        return self._order()[self.step * b:(self.step + 1) * b]

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        idx = self.global_indices()
        per = self.global_batch // self.num_ranks
        mine = idx[self.rank * per:(self.rank + 1) * per]
        rows = [self.stream.sequence(int(i), self.seq_len) for i in mine]
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        self.step += 1
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch


def validation_batches(stream: TokenStream, *, seq_len: int, batch: int, max_batches: int | None = None):
    """Fixed-order validation batches covering the split (the last partial batch is dropped)."""
    n = stream.num_sequences(seq_len) // batch
    if max_batches is not None:
        n = min(n, max_batches)
    for b in range(n):
        rows = [stream.sequence(i, seq_len) for i in range(b * batch, (b + 1) * batch)]
        yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}
