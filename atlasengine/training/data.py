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
SHUFFLE_CHUNK = 64
"""Consecutive cells that stay together when a block is put together (tiledbsoma-ml's ``shuffle_chunk_size``)."""


def _in_memory(cells: CellSource) -> bool:
    return isinstance(cells, CellData)


@dataclass(frozen=True)
class Draw:
    """One minibatch of a block-wise epoch: its positions and the blocks (key, sorted positions) they lie in."""

    positions: np.ndarray
    blocks: tuple[tuple[int, np.ndarray], ...]


class RowBatches(Dataset):
    """Dataset whose items are whole minibatches: ``dataset[positions] -> (x, batch)``.

    Positions run over ``parts`` one after another, each ``(cells, rows)`` standing for
    ``cells``' rows ``rows``. Cells in memory are read where they are, never copied (a copy of
    a 1M-cell training split held 1.1 GB). Cells in the store are read a block at a time: a
    :class:`Draw` names the blocks its positions lie in (the sampler's random blocks), plain
    positions are read in blocks of ``block`` consecutive positions (the validation split). At
    most two blocks are held (a minibatch may span the end of one and the start of the next),
    so memory holds two blocks whatever the atlas's size.
    """

    def __init__(self, parts: list[tuple[CellSource, np.ndarray]], block: int = BLOCK_CELLS) -> None:
        self.parts = [(data, np.asarray(rows, dtype=np.int64)) for data, rows in parts]
        self.offsets = np.cumsum([0] + [len(rows) for _, rows in self.parts])
        self.block = block
        self._cache: dict[tuple[int, int], CellData] = {}  # (part, block key) -> the block's cells
        self.n_genes = self.parts[0][0].n_genes if self.parts else 0

    def __len__(self) -> int:
        """Return the number of rows over all parts."""
        return int(self.offsets[-1])

    def __getstate__(self) -> dict:
        """Pickle without the cached blocks (a DataLoader worker or a forked process reads its own)."""
        return {**self.__dict__, "_cache": {}}

    def _read_block(self, k: int, key: int, local: np.ndarray) -> CellData:
        """Return the cells of part ``k`` at the sorted local positions ``local``, read once per block ``key``."""
        if (k, key) not in self._cache:
            while len(self._cache) >= 2:  # the oldest block goes before the next is read
                self._cache.pop(next(iter(self._cache)))
            data, rows = self.parts[k]
            self._cache[(k, key)] = data.read(rows[local])
        return self._cache[(k, key)]

    def __getitem__(self, item: np.ndarray | Draw) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, batch)`` of the rows at ``positions``: dense float32 counts and int64 batch indices."""
        positions = np.asarray(item.positions if isinstance(item, Draw) else item, dtype=np.int64)
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
            if isinstance(item, Draw):
                blocks = [(-1 - key, block) for key, block in item.blocks]  # keys < 0: the sampler's blocks
            else:
                numbers = np.unique(local // self.block)
                blocks = [(int(n), np.arange(n * self.block, min((n + 1) * self.block, len(rows)))) for n in numbers]
            todo = np.ones(len(local), dtype=bool)
            for key, block in blocks:
                at = np.flatnonzero(todo)
                inside = np.searchsorted(block, local[at])
                found = (inside < len(block)) & (block[np.minimum(inside, len(block) - 1)] == local[at])
                if not found.any():
                    continue
                cells = self._read_block(int(k), key, block)
                take = at[found]
                x[here[take]] = cells.counts[inside[found]].toarray()
                batch[here[take]] = cells.batch[inside[found]]
                todo[take] = False
            if todo.any():
                raise IndexError(f"{int(todo.sum())} position(s) lie in none of the minibatch's blocks")
        return torch.from_numpy(x), torch.from_numpy(batch)


class MixedBatchSampler(Sampler[np.ndarray | Draw]):
    """Index batches over ``[query cells | replay cells]``.

    One epoch is one pass over the query cells; each batch holds ``replay_fraction`` of
    replayed cells, drawn without replacement from the replay pool (reshuffled when used up).
    A short batch (the epoch's last, or a query smaller than one batch) gets replayed cells in
    the same proportion to its query cells (at least one), so the replayed share, and the EWC
    strength that assumes it, hold for every step.

    With ``block`` (query cells read from the store), an epoch is shuffled as tiledbsoma-ml
    does: the query positions are cut into chunks of ``chunk`` consecutive cells, the chunks
    shuffled and grouped ``block // chunk`` at a time into blocks, each block read once and its
    cells shuffled. A block so holds cells from all over the data (storage order is often one
    batch after another: blocks of consecutive cells gave one-batch minibatches), and each
    minibatch is a :class:`Draw` naming the blocks it lies in. Below one block this is the plain
    shuffle, draw for draw.
    """

    def __init__(self, n_query: int, n_replay: int, batch_size: int, replay_fraction: float, seed: int,
                 block: int | None = None, chunk: int = SHUFFLE_CHUNK) -> None:
        self.n_query, self.n_replay = n_query, n_replay
        self.n_q_per, self.n_rep_per = minibatch_split(batch_size, replay_fraction if n_replay > 0 else 0.0)
        # at least 1,024 chunks per block (tiledbsoma-ml's defaults: 64-cell chunks, 65,536-cell blocks)
        self.block, self.chunk = block, max(1, min(chunk, (block or 0) // 1024))
        self.rng = np.random.default_rng(seed)
        self._pool = np.zeros(0, dtype=np.int64)
        self._blocks_drawn = 0

    def _replay(self, n: int) -> np.ndarray:
        while len(self._pool) < n:
            self._pool = np.concatenate([self._pool, self.n_query + self.rng.permutation(self.n_replay)])
        out, self._pool = self._pool[:n], self._pool[n:]
        return out

    @property
    def blockwise(self) -> bool:
        """Whether epochs are drawn block by block (query cells in the store, more of them than one block)."""
        return self.block is not None and self.n_query > self.block

    def _blocks(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """One epoch's blocks: (key, sorted positions, the order they are drawn in)."""
        starts = self.rng.permutation(np.arange(0, self.n_query, self.chunk))
        per = max(1, self.block // self.chunk)
        out = []
        for g in range(0, len(starts), per):
            cells = np.sort(np.concatenate([np.arange(s, min(s + self.chunk, self.n_query)) for s in starts[g:g + per]]))
            out.append((self._blocks_drawn, cells, self.rng.permutation(cells)))
            self._blocks_drawn += 1
        return out

    def __len__(self) -> int:
        """Return the number of batches per epoch (a 1-cell query tail is dropped unless it is the only cell)."""
        full, rest = divmod(self.n_query, self.n_q_per)
        return full + int(rest >= 2 or (rest == 1 and self.n_query < 2))  # as __iter__: a 1-cell tail is dropped

    def replayed_beside(self, n_query_cells: int) -> int:
        """Return how many replayed cells a minibatch of ``n_query_cells`` query cells holds.

        >>> s = MixedBatchSampler(n_query=250, n_replay=1000, batch_size=128, replay_fraction=0.25, seed=0)
        >>> s.replayed_beside(96), s.replayed_beside(58), s.replayed_beside(2)
        (32, 19, 1)
        """
        if self.n_rep_per == 0 or n_query_cells >= self.n_q_per:
            return self.n_rep_per
        return max(1, int(round(n_query_cells * self.n_rep_per / self.n_q_per)))

    def cells_per_epoch(self) -> int:
        """Return the cells an epoch trains on: every query cell (less a dropped 1-cell tail) and the replayed ones.

        >>> MixedBatchSampler(n_query=250, n_replay=1000, batch_size=128, replay_fraction=0.25, seed=0).cells_per_epoch()
        333
        """
        full, tail = divmod(self.n_query, self.n_q_per)
        tail_trains = tail >= 2 or (tail == 1 and self.n_query < 2)
        query = self.n_query - int(tail == 1 and self.n_query >= 2)
        return query + self.n_rep_per * full + (self.replayed_beside(tail) if tail_trains else 0)

    def __iter__(self):
        """Yield one epoch of index batches: shuffled query cells, each batch with its share of replay cells."""
        blocks = self._blocks() if self.blockwise else []
        order = np.concatenate([b[2] for b in blocks]) if blocks else self.rng.permutation(self.n_query)
        ends = np.cumsum([len(b[1]) for b in blocks])
        for s in range(0, self.n_query, self.n_q_per):
            q = order[s : s + self.n_q_per]
            if len(q) == 1 < self.n_q_per and self.n_query >= 2:  # a 1-cell tail gives a noisy step: skip it
                continue
            positions = np.concatenate([q, self._replay(self.replayed_beside(len(q)))]) if self.n_rep_per else q
            if not blocks:
                yield positions
                continue
            first, last = np.searchsorted(ends, [s, s + len(q) - 1], side="right")
            yield Draw(positions, tuple((key, cells) for key, cells, _ in blocks[first : last + 1]))


def minibatch_split(batch_size: int, replay_fraction: float) -> tuple[int, int]:
    """Return the query cells and the replayed cells of every minibatch: ``round(B * r)`` replayed, >= 1 query cell.

    >>> minibatch_split(128, 0.25), minibatch_split(2, 0.75)
    ((96, 32), (1, 2))
    """
    replayed = int(round(batch_size * replay_fraction))
    return max(1, batch_size - replayed), replayed


def trained_cells(n: int, fraction: float) -> int:
    """Return how many of ``n`` cells train when ``fraction`` is held out (:func:`train_val_split`'s rule).

    >>> trained_cells(1000, 0.1), trained_cells(15, 0.1)
    (900, 15)
    """
    n_val = int(n * fraction)
    return n if n_val < 2 or n - n_val < 2 else n - n_val


def train_val_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random held-out split; no validation set when it would hold fewer than 2 cells."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_train = trained_cells(n, fraction)
    return perm[n - n_train:], perm[:n - n_train]


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
    if stored and len(query) > block:  # storage order: a chunk of positions is one run of the store
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
