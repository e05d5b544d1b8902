"""The fold-in minibatches: every batch mixes query and replayed cells, and the sampler's length
(what Lightning's progress bar and epoch bookkeeping read) equals the batches it yields."""

from __future__ import annotations

import numpy as np
import pytest

from atlasengine.training.data import MixedBatchSampler


@pytest.mark.parametrize(
    ("n_query", "n_replay", "batch_size", "replay_fraction"),
    [(1, 0, 128, 0.0), (2, 0, 128, 0.0), (129, 0, 128, 0.0), (130, 0, 128, 0.0), (97, 500, 128, 0.25),
     (96 * 3 + 1, 50, 128, 0.25), (1000, 10, 64, 0.5), (5, 5, 4, 0.75)],
)
def test_batches_mix_query_and_replay_and_the_length_is_exact(n_query, n_replay, batch_size, replay_fraction):
    sampler = MixedBatchSampler(n_query, n_replay, batch_size, replay_fraction, seed=0)
    for _ in range(2):  # two epochs: the replay pool carries over between them
        batches = list(sampler)
        assert len(batches) == len(sampler)
        query = np.concatenate([b[b < n_query] for b in batches])
        assert len(np.unique(query)) == len(query)  # each query cell at most once per epoch
        assert len(query) >= n_query - 1  # only a 1-cell tail may be skipped
        for b in batches:
            replay = b[b >= n_query]
            assert len(replay) == sampler.replayed_beside(len(b) - len(replay)) and (replay < n_query + n_replay).all()
            if n_replay:
                assert 0 < len(b) - len(replay)  # never a batch of replayed cells only


def test_a_short_batch_replays_cells_in_the_same_proportion():
    # found by a review: a 27-cell query got 32 replayed cells (54% replayed where the EWC strength
    # assumes 25%), and every epoch's last batch the same
    sampler = MixedBatchSampler(27, 5000, 128, 0.25, seed=0)
    (batch,) = list(sampler)
    assert (batch < 27).sum() == 27 and (batch >= 27).sum() == 9  # 27 * 32 / 96
    tail = list(MixedBatchSampler(900, 5000, 128, 0.25, seed=0))[-1]
    assert (tail < 900).sum() == 36 and (tail >= 900).sum() == 12
    assert len(list(MixedBatchSampler(2, 50, 128, 0.25, seed=0))[0]) == 3  # at least one replayed cell


def test_the_cells_an_epoch_counts_are_the_cells_it_yields():
    # the throughput a training reports divides these by its seconds: a short last batch, and a
    # 1-cell tail that is skipped, must not count as full batches
    from atlasengine.training.data import MixedBatchSampler

    for n_query, n_replay, fraction in [(250, 1000, 0.25), (97, 500, 0.25), (129, 0, 0.0), (1, 0, 0.0), (960, 40, 0.25)]:
        sampler = MixedBatchSampler(n_query, n_replay, 128, fraction, seed=0)
        assert sampler.cells_per_epoch() == sum(len(b) for b in sampler), (n_query, n_replay)
