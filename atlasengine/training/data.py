"""Minibatches of count rows for Lightning: whole batches are sliced at once (no per-cell collate).

``MixedBatchSampler`` builds every training batch from query cells plus a configurable share of
replayed reference cells, so an EWC fold-in keeps seeing the reference it must not forget.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


@dataclass
class CellData:
    """Counts (CSR, cells x genes) with each cell's batch index in the model."""

    counts: sp.csr_matrix
    batch: np.ndarray

    def __post_init__(self) -> None:
        """Convert ``counts`` to float32 CSR and ``batch`` to int64."""
        self.counts = sp.csr_matrix(self.counts, dtype=np.float32)
        self.batch = np.asarray(self.batch, dtype=np.int64)

    def __len__(self) -> int:
        """Return the number of cells."""
        return self.counts.shape[0]

    def read(self, positions: np.ndarray) -> "CellData":
        """Return the cells at ``positions`` (a :class:`CellSource` that is already in memory)."""
        positions = np.asarray(positions, dtype=np.int64)
        return CellData(self.counts[positions], self.batch[positions])


class CellSource(Protocol):
    """Cells that can be read a few at a time.

    A :class:`CellData` in memory, or the cells of an atlas version whose older part sits in
    the store.
    """

    def __len__(self) -> int:
        """Return the number of cells."""

    def read(self, positions: np.ndarray) -> CellData:
        """Read counts and batch indices of the cells at ``positions`` (in that order)."""


def iter_chunks(cells: CellSource, chunk_size: int) -> Iterator[CellData]:
    """``cells`` in consecutive parts of at most ``chunk_size`` cells."""
    for s in range(0, len(cells), chunk_size):
        yield cells.read(np.arange(s, min(s + chunk_size, len(cells)), dtype=np.int64))


class RowBatches(Dataset):
    """Dataset whose items are whole minibatches: ``dataset[positions] -> (x, batch)``.

    Positions run over ``parts`` one after another, each ``(data, rows)`` standing for
    ``data``'s rows ``rows``: the training split and the replayed cells are read where they
    are, never copied (a copy of a 1M-cell training split held 1.1 GB).
    """

    def __init__(self, parts: list[tuple[CellData, np.ndarray]]) -> None:
        self.parts = [(data, np.asarray(rows, dtype=np.int64)) for data, rows in parts]
        self.offsets = np.cumsum([0] + [len(rows) for _, rows in self.parts])
        self.n_genes = self.parts[0][0].counts.shape[1] if self.parts else 0

    def __len__(self) -> int:
        """Return the number of rows over all parts."""
        return int(self.offsets[-1])

    def __getitem__(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, batch)`` of the rows at ``positions``: dense float32 counts and int64 batch indices."""
        positions = np.asarray(positions, dtype=np.int64)
        part = np.searchsorted(self.offsets, positions, side="right") - 1
        x = np.empty((len(positions), self.n_genes), dtype=np.float32)
        batch = np.empty(len(positions), dtype=np.int64)
        for k in np.unique(part):
            here = part == k
            data, rows = self.parts[k]
            picked = rows[positions[here] - self.offsets[k]]
            x[here] = data.counts[picked].toarray()
            batch[here] = data.batch[picked]
        return torch.from_numpy(x), torch.from_numpy(batch)


class MixedBatchSampler(Sampler[np.ndarray]):
    """Index batches over ``[query cells | replay cells]``.

    One epoch is one pass over the query cells; each batch holds ``replay_fraction`` of
    replayed cells, drawn without replacement from the replay pool (reshuffled when used up).
    """

    def __init__(self, n_query: int, n_replay: int, batch_size: int, replay_fraction: float, seed: int) -> None:
        self.n_query, self.n_replay = n_query, n_replay
        r = replay_fraction if n_replay > 0 else 0.0
        self.n_rep_per = int(round(batch_size * r))
        self.n_q_per = max(1, batch_size - self.n_rep_per)
        self.rng = np.random.default_rng(seed)
        self._pool = np.zeros(0, dtype=np.int64)

    def _replay(self, n: int) -> np.ndarray:
        while len(self._pool) < n:
            self._pool = np.concatenate([self._pool, self.n_query + self.rng.permutation(self.n_replay)])
        out, self._pool = self._pool[:n], self._pool[n:]
        return out

    def __len__(self) -> int:
        """Return the number of batches per epoch (a 1-cell query tail is dropped unless it is the only cell)."""
        full, rest = divmod(self.n_query, self.n_q_per)
        return full + int(rest >= 2 or (rest == 1 and self.n_query < 2))  # as __iter__: a 1-cell tail is dropped

    def __iter__(self):
        """Yield one epoch of index batches: shuffled query cells, each batch with its share of replay cells."""
        order = self.rng.permutation(self.n_query)
        for s in range(0, self.n_query, self.n_q_per):
            q = order[s : s + self.n_q_per]
            if len(q) == 1 < self.n_q_per and self.n_query >= 2:  # a 1-cell tail gives a noisy step: skip it
                continue
            yield np.concatenate([q, self._replay(self.n_rep_per)]) if self.n_rep_per else q


def train_val_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random held-out split; no validation set when it would hold fewer than 2 cells."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = int(n * fraction)
    if n_val < 2 or n - n_val < 2:
        return perm, np.zeros(0, dtype=np.int64)
    return perm[n_val:], perm[:n_val]


def make_loaders(
    query: CellData,
    replay: CellData | None,
    batch_size: int,
    replay_fraction: float,
    validation_fraction: float,
    seed: int,
) -> tuple[DataLoader, DataLoader | None]:
    """Training loader (query + replay mixed) and validation loader (held-out query cells)."""
    train_idx, val_idx = train_val_split(len(query), validation_fraction, seed)
    n_rep = len(replay) if replay is not None else 0
    parts = [(query, train_idx)] + ([(replay, np.arange(n_rep))] if n_rep else [])
    sampler = MixedBatchSampler(len(train_idx), n_rep, batch_size, replay_fraction, seed)
    train = DataLoader(RowBatches(parts), sampler=sampler, batch_size=None)
    if len(val_idx) == 0:
        return train, None
    chunks = [np.arange(s, min(s + batch_size, len(val_idx))) for s in range(0, len(val_idx), batch_size)]
    val = DataLoader(RowBatches([(query, val_idx)]), sampler=chunks, batch_size=None)
    return train, val
