"""A faiss nearest-neighbour index over reference embeddings, with the reference labels.

Example:
    >>> import numpy as np
    >>> from atlasengine.config import TransferConfig
    >>> emb = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    >>> idx = NeighborIndex.build(emb, np.array(["a", "b"] * 50), TransferConfig(k=5))
    >>> d, i = idx.search(emb[:3], 5)
    >>> d.shape, idx.kind, idx.n
    ((3, 5), 'exact', 100)
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from atlasengine.config import TransferConfig
from atlasengine.errors import AtlasFormatError, InputError
from atlasengine.numerics import as_matrix, drop_self

FORMAT_VERSION = 1
INDEX_FILE = "neighbor_index.faiss"
CODES_FILE = "neighbor_index_codes.npy"
META_FILE = "neighbor_index.json"
SEARCH_CHUNK = 16_384
_IVF_MIN_POINTS_PER_CENTROID = 39
_IVF_MAX_TRAIN_PER_CENTROID = 256


class NeighborIndex:
    """Reference embeddings in a faiss L2 index plus integer-coded reference labels."""

    def __init__(self, index: faiss.Index, kind: str, codes: np.ndarray, categories: list[str]):
        if index.ntotal != len(codes):
            raise AtlasFormatError(f"index holds {index.ntotal} cells but {len(codes)} label codes")
        if len(codes) and (codes.min() < 0 or codes.max() >= len(categories)):
            raise AtlasFormatError("label codes out of range of the label categories")
        self._index = index
        self._kind = kind
        self.codes = np.asarray(codes, dtype=np.int32)
        self.categories = list(categories)

    @property
    def kind(self) -> str:
        """Resolved index kind: "exact", "hnsw" or "ivf"."""
        return self._kind

    @property
    def n(self) -> int:
        """Number of reference cells."""
        return int(self._index.ntotal)

    @property
    def d(self) -> int:
        """Embedding dimension."""
        return int(self._index.d)

    @classmethod
    def build(cls, embeddings: np.ndarray, labels: np.ndarray, config: TransferConfig) -> NeighborIndex:
        """Index reference ``embeddings`` (n, d) carrying string ``labels`` (n,)."""
        emb = as_matrix(embeddings, "embeddings", dtype=np.float32)
        n, d = emb.shape
        if n == 0 or d == 0:
            raise InputError(f"embeddings must be non-empty, got shape {emb.shape}")
        lab = np.asarray(labels, dtype=object)
        if lab.ndim != 1 or len(lab) != n:
            raise InputError(f"labels must be 1-D with {n} entries, got shape {lab.shape}")
        if pd.isna(lab).any():
            raise InputError("labels contain missing values")
        categories, codes = np.unique(lab.astype(str), return_inverse=True)
        kind = config.index
        if kind == "auto":
            kind = "exact" if n <= config.approximate_above else "ivf"
        if kind == "exact":
            index = faiss.IndexFlatL2(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, config.hnsw_m)
            index.hnsw.efSearch = config.hnsw_ef_search
        else:
            nlist = max(1, min(config.ivf_nlist, n // _IVF_MIN_POINTS_PER_CENTROID))
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist, faiss.METRIC_L2)
            n_train = min(n, nlist * _IVF_MAX_TRAIN_PER_CENTROID)
            sample = np.random.default_rng(0).choice(n, size=n_train, replace=False)
            index.train(emb[np.sort(sample)])
            index.nprobe = min(config.ivf_nprobe, nlist)
        index.add(emb)
        return cls(index, kind, codes.astype(np.int32), [str(c) for c in categories])

    def search(
        self, query: np.ndarray, k: int, chunk_size: int = SEARCH_CHUNK, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return Euclidean distances and reference indices (n_query, min(k, n)), nearest first.

        Missing neighbours (possible with approximate indices) have index -1 and distance inf.
        ``exclude``: for query rows that are indexed cells themselves, their index position
        (-1 for the others); such a row is answered without itself, so where ``k >= n`` its last
        column is missing (-1, inf).
        """
        if exclude is not None:
            return self._search_excluding(query, k, np.asarray(exclude, dtype=np.int64), chunk_size)
        q = as_matrix(query, "query", dtype=np.float32, d=self.d)
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        k = min(int(k), self.n)
        dist = np.empty((q.shape[0], k), dtype=np.float32)
        idx = np.empty((q.shape[0], k), dtype=np.int64)
        for start in range(0, q.shape[0], chunk_size):
            stop = start + chunk_size
            dist[start:stop], idx[start:stop] = self._index.search(q[start:stop], k)
        missing = idx < 0
        np.sqrt(np.maximum(dist, 0.0), out=dist)
        dist[missing] = np.inf
        return dist, idx

    def _search_excluding(self, query: np.ndarray, k: int, exclude: np.ndarray,
                          chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
        """One search for k + 1 neighbours, then :func:`~atlasengine.numerics.drop_self`."""
        if len(exclude) != len(query):
            raise InputError(f"exclude has {len(exclude)} entries for {len(query)} query rows")
        d, i = self.search(query, k + 1, chunk_size)
        return drop_self(d, i, exclude, min(int(k), self.n))

    def neighbor_codes(self, indices: np.ndarray) -> np.ndarray:
        """Label codes of neighbour ``indices``; -1 stays -1 (missing neighbour)."""
        return np.where(indices >= 0, self.codes[np.maximum(indices, 0)], -1)

    def save(self, directory: Path) -> list[Path]:
        """Write the index (faiss format), label codes (npy) and metadata (JSON); return paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = [directory / INDEX_FILE, directory / CODES_FILE, directory / META_FILE]
        faiss.write_index(self._index, str(paths[0]))
        np.save(paths[1], self.codes, allow_pickle=False)
        meta = {"format_version": FORMAT_VERSION, "kind": self._kind, "n": self.n, "d": self.d,
                "categories": self.categories, "search_params": self._search_params()}
        paths[2].write_text(json.dumps(meta, indent=1))
        return paths

    @classmethod
    def load(cls, directory: Path) -> NeighborIndex:
        """Read an index written by :meth:`save`."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text())
            if meta.get("format_version") != FORMAT_VERSION:
                raise AtlasFormatError(f"unknown neighbour-index format {meta.get('format_version')!r}")
            codes = np.load(directory / CODES_FILE, allow_pickle=False)
            index = faiss.read_index(str(directory / INDEX_FILE))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise AtlasFormatError(f"cannot read neighbour index in {directory}: {exc}") from exc
        if meta["kind"] not in ("exact", "hnsw", "ivf") or index.d != meta["d"]:
            raise AtlasFormatError(f"inconsistent neighbour-index metadata in {directory}")
        out = cls(index, meta["kind"], codes, meta["categories"])
        out._set_search_params(meta.get("search_params", {}))
        return out

    def _search_params(self) -> dict[str, int]:
        if self._kind == "hnsw":
            return {"efSearch": int(faiss.downcast_index(self._index).hnsw.efSearch)}
        if self._kind == "ivf":
            return {"nprobe": int(faiss.extract_index_ivf(self._index).nprobe)}
        return {}

    def _set_search_params(self, params: dict[str, int]) -> None:
        if self._kind == "hnsw" and "efSearch" in params:
            faiss.downcast_index(self._index).hnsw.efSearch = int(params["efSearch"])
        if self._kind == "ivf" and "nprobe" in params:
            faiss.extract_index_ivf(self._index).nprobe = int(params["nprobe"])
