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

    @property
    def n_genes(self) -> int:
        """Return the number of genes (columns)."""
        return self.counts.shape[1]

    def read(self, positions: np.ndarray) -> "CellData":
        """Return the cells at ``positions`` (a :class:`CellSource` that is already in memory)."""
        positions = np.asarray(positions, dtype=np.int64)
        return CellData(self.counts[positions], self.batch[positions])


class CellSource(Protocol):
    """Cells that can be read a few at a time.

    A :class:`CellData` in memory, or the cells of an atlas version whose older part sits in
    the store.
    """

    n_genes: int

    def __len__(self) -> int:
        """Return the number of cells."""

    def read(self, positions: np.ndarray) -> CellData:
        """Read counts and batch indices of the cells at ``positions`` (in that order)."""


def iter_chunks(cells: CellSource, chunk_size: int) -> Iterator[CellData]:
    """``cells`` in consecutive parts of at most ``chunk_size`` cells."""
    for s in range(0, len(cells), chunk_size):
        yield cells.read(np.arange(s, min(s + chunk_size, len(cells)), dtype=np.int64))


BLOCK_CELLS = 65_536
"""Cells read from the store at a time when training on cells that are not in memory (a shuffle block)."""


def _in_memory(cells: CellSource) -> bool:
    return isinstance(cells, CellData)


class RowBatches(Dataset):
    """Dataset whose items are whole minibatches: ``dataset[positions] -> (x, batch)``.

    Positions run over ``parts`` one after another, each ``(cells, rows)`` standing for
    ``cells``' rows ``rows``. Cells in memory are read where they are, never copied (a copy of
    a 1M-cell training split held 1.1 GB). Cells in the store are read a block of ``block``
    consecutive positions at a time (``rows`` sorted: one contiguous read) and the block is kept
    until a minibatch needs another, so memory holds one block whatever the atlas's size; the
    sampler visits blocks one after another (:class:`MixedBatchSampler`).
    """

    def __init__(self, parts: list[tuple[CellSource, np.ndarray]], block: int = BLOCK_CELLS) -> None:
        self.parts = [(data, np.asarray(rows, dtype=np.int64)) for data, rows in parts]
        self.offsets = np.cumsum([0] + [len(rows) for _, rows in self.parts])
        self.block = block
        self._cached: tuple[int, int, CellData] | None = None  # (part, block number, its cells)
        self.n_genes = self.parts[0][0].n_genes if self.parts else 0

    def __len__(self) -> int:
        """Return the number of rows over all parts."""
        return int(self.offsets[-1])

    def __getstate__(self) -> dict:
        """Pickle without the cached block (a DataLoader worker or a forked process reads its own)."""
        return {**self.__dict__, "_cached": None}

    def _block_of(self, k: int, number: int) -> CellData:
        if self._cached is None or self._cached[:2] != (k, number):
            data, rows = self.parts[k]
            self._cached = None  # let the old block go before reading the next
            self._cached = (k, number, data.read(rows[number * self.block : (number + 1) * self.block]))
        return self._cached[2]

    def __getitem__(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, batch)`` of the rows at ``positions``: dense float32 counts and int64 batch indices."""
        positions = np.asarray(positions, dtype=np.int64)
        part = np.searchsorted(self.offsets, positions, side="right") - 1
        x = np.empty((len(positions), self.n_genes), dtype=np.float32)
        batch = np.empty(len(positions), dtype=np.int64)
        for k in np.unique(part):
            here = np.flatnonzero(part == k)
            data, rows = self.parts[k]
            local = positions[here] - self.offsets[k]
            if _in_memory(data):
                picked = rows[local]
                x[here] = data.counts[picked].toarray()
                batch[here] = data.batch[picked]
                continue
            numbers = local // self.block
            for number in np.unique(numbers):  # in the order the sampler reaches them
                at = numbers == number
                cells = self._block_of(int(k), int(number))
                within = local[at] - number * self.block
                x[here[at]] = cells.counts[within].toarray()
                batch[here[at]] = cells.batch[within]
        return torch.from_numpy(x), torch.from_numpy(batch)


class MixedBatchSampler(Sampler[np.ndarray]):
    """Index batches over ``[query cells | replay cells]``.

    One epoch is one pass over the query cells; each batch holds ``replay_fraction`` of
    replayed cells, drawn without replacement from the replay pool (reshuffled when used up).
    With ``block`` (query cells read from the store), the query order is shuffled block by
    block: the blocks in random order, the cells of each block in random order, so a block is
    read once per epoch. Below one block this is the plain shuffle, draw for draw.
    """

    def __init__(self, n_query: int, n_replay: int, batch_size: int, replay_fraction: float, seed: int,
                 block: int | None = None) -> None:
        self.n_query, self.n_replay = n_query, n_replay
        r = replay_fraction if n_replay > 0 else 0.0
        self.n_rep_per = int(round(batch_size * r))
        self.n_q_per = max(1, batch_size - self.n_rep_per)
        self.block = block
        self.rng = np.random.default_rng(seed)
        self._pool = np.zeros(0, dtype=np.int64)

    def _replay(self, n: int) -> np.ndarray:
        while len(self._pool) < n:
            self._pool = np.concatenate([self._pool, self.n_query + self.rng.permutation(self.n_replay)])
        out, self._pool = self._pool[:n], self._pool[n:]
        return out

    def _order(self) -> np.ndarray:
        if self.block is None or self.n_query <= self.block:
            return self.rng.permutation(self.n_query)
        starts = self.rng.permutation(np.arange(0, self.n_query, self.block))
        return np.concatenate([s + self.rng.permutation(min(self.block, self.n_query - s)) for s in starts])

    def __len__(self) -> int:
        """Return the number of batches per epoch (a 1-cell query tail is dropped unless it is the only cell)."""
        full, rest = divmod(self.n_query, self.n_q_per)
        return full + int(rest >= 2 or (rest == 1 and self.n_query < 2))  # as __iter__: a 1-cell tail is dropped

    def __iter__(self):
        """Yield one epoch of index batches: shuffled query cells, each batch with its share of replay cells."""
        order = self._order()
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
    query: CellSource,
    replay: CellSource | None,
    batch_size: int,
    replay_fraction: float,
    validation_fraction: float,
    seed: int,
    block: int = BLOCK_CELLS,
) -> tuple[DataLoader, DataLoader | None]:
    """Training loader (query + replay mixed) and validation loader (held-out query cells).

    Query cells in memory are drawn in one shuffle per epoch; query cells in the store are read
    ``block`` at a time (:class:`RowBatches`), in shuffled blocks.
    """
    train_idx, val_idx = train_val_split(len(query), validation_fraction, seed)
    stored = not _in_memory(query)
    if stored and len(query) > block:  # storage order: a block of positions is one contiguous read
        train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    # (within one block the order stays as drawn: the same minibatches as the cells in memory)
    n_rep = len(replay) if replay is not None else 0
    parts = [(query, train_idx)] + ([(replay, np.arange(n_rep))] if n_rep else [])
    sampler = MixedBatchSampler(len(train_idx), n_rep, batch_size, replay_fraction, seed,
                                block=block if stored else None)
    train = DataLoader(RowBatches(parts, block), sampler=sampler, batch_size=None)
    if len(val_idx) == 0:
        return train, None
    chunks = [np.arange(s, min(s + batch_size, len(val_idx))) for s in range(0, len(val_idx), batch_size)]
    val = DataLoader(RowBatches([(query, val_idx)], block), sampler=chunks, batch_size=None)
    return train, val
