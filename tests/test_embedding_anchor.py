"""The embedding anchor: a penalty that holds the replayed reference cells' embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from atlasengine import Atlas
from atlasengine.config import ModelConfig
from atlasengine.continual.anchor import EmbeddingAnchor
from atlasengine.continual.ewc import EWCPenalty
from atlasengine.continual.strategies import PenaltySum
from atlasengine.model import CVAE


def _module() -> CVAE:
    torch.manual_seed(0)
    m = CVAE(n_genes=20, n_batches=2, config=ModelConfig(n_hidden=16, n_latent=4, dropout_rate=0.5))
    return m.train()


def test_the_anchor_is_zero_before_training_even_with_dropout_on():
    m = _module()
    anchor = EmbeddingAnchor(m, n_old_batches=2, weight=100.0)
    m.add_batches(1)
    x = torch.poisson(torch.full((8, 20), 3.0))
    assert anchor(m, x, torch.tensor([0, 1, 2, 2, 0, 1, 2, 0])).item() == 0.0
    assert m.training  # the anchor's own forward without dropout leaves the module in training mode


def test_only_replayed_cells_count_and_their_gradient_reaches_the_encoder():
    m = _module()
    anchor = EmbeddingAnchor(m, n_old_batches=2, weight=1.0)
    m.add_batches(1)
    x = torch.poisson(torch.full((6, 20), 3.0))
    with torch.no_grad():
        m.encoder.layers[0].batch_weight[2] += 5.0  # moves only the new batch's cells
    assert anchor(m, x, torch.tensor([0, 1, 2, 2, 0, 1])).item() == pytest.approx(0.0, abs=1e-6)
    assert anchor(m, x, torch.full((6,), 2)).item() == 0.0  # no replayed cell: nothing to hold
    with torch.no_grad():
        m.z_mean.bias += 0.5
    value = anchor(m, x, torch.tensor([0, 1, 2, 2, 0, 1]))
    assert value.item() == pytest.approx(4 * 4 * 0.25 / 6)  # 4 replayed cells x 4 dims x 0.5^2, / 6 cells
    value.backward()
    assert m.z_mean.bias.grad.abs().sum() > 0 and m.encoder.layers[0].linear.weight.grad.abs().sum() > 0


def test_penalties_add_up():
    m = _module()
    fisher = {n: torch.ones_like(p) for n, p in m.named_parameters()}
    anchor_weights = {n: p.detach() - 1 for n, p in m.named_parameters()}
    ewc = EWCPenalty(m, fisher, anchor_weights, ewc_lambda=2.0)
    emb = EmbeddingAnchor(m, n_old_batches=2, weight=3.0)
    x, b = torch.poisson(torch.full((4, 20), 3.0)), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        m.z_mean.bias += 1.0
    total = PenaltySum(ewc, emb)(m, x, b)
    assert total.item() == pytest.approx(ewc(m).item() + emb(m, x, b).item(), rel=1e-6)
    assert PenaltySum.of([]) is None and PenaltySum.of([emb]) is emb  # none, or one passed as itself
    assert PenaltySum.of([ewc, emb])(m, x, b).item() == pytest.approx(total.item(), rel=1e-6)


def _reference_displacement(atlas_path, query, **continual) -> tuple[float, dict]:
    atlas = Atlas.open(atlas_path)
    before = atlas.latent()
    res = atlas.ingest(query, batch_key="tech", strategy="ewc", continual={"ewc_lambda": 0.0, **continual},
                       training={"max_epochs": 15})
    assert (atlas.obs()["version_added"].to_numpy()[: len(before)] == 1).all()
    after = atlas.latent()[: len(before)]
    run = json.loads((atlas_path / "versions" / f"v{res.version.number:04d}" / "config.json").read_text())
    return float(np.linalg.norm(after - before, axis=1).mean()), run


def test_an_ewc_fold_in_with_the_anchor_holds_the_reference_embedding(reference_atlas, tmp_path, pancreas_query):
    import shutil

    free, held = tmp_path / "free.atlas", tmp_path / "held.atlas"
    shutil.copytree(reference_atlas, free)
    shutil.copytree(reference_atlas, held)
    moved_free, run = _reference_displacement(free, pancreas_query, embedding_anchor=0.0)  # replay alone: it moves
    moved_held, _ = _reference_displacement(held, pancreas_query, embedding_anchor=1000.0)
    assert moved_held < 0.5 * moved_free, (moved_held, moved_free)
    assert run["continual"]["embedding_anchor"] == 0.0  # the version records how it was folded in
    assert Atlas.open(free).config.continual.embedding_anchor == 1000.0  # a per-ingest setting, not the atlas's


def test_the_anchor_without_replayed_cells_is_refused_before_anything_is_written(atlas_path, pancreas_query):
    from atlasengine.errors import InputError

    before = sorted(p.name for p in atlas_path.rglob("*"))
    with pytest.raises(InputError, match="replays none"):
        Atlas.open(atlas_path).ingest(pancreas_query, batch_key="tech", strategy="ewc", training={"max_epochs": 1},
                                      continual={"embedding_anchor": 10.0, "replay_fraction": 0.0})
    assert Atlas.open(atlas_path).version == 1 and sorted(p.name for p in atlas_path.rglob("*")) == before


def test_settings_under_which_no_training_process_replays_a_cell_are_refused():
    # with several processes each takes its share of every minibatch and replays round(share *
    # replay_fraction) cells: 2 processes of a 4-cell minibatch at 0.2 replay none, so the anchor
    # would hold nothing (one process replays 1)
    from atlasengine.config import ContinualConfig, RuntimeConfig, TrainingConfig
    from atlasengine.continual.strategies import check_settings, penalty_strength
    from atlasengine.errors import InputError
    from atlasengine.training import batch_per_process

    training, continual = TrainingConfig(batch_size=4), ContinualConfig(replay_fraction=0.2)
    two = RuntimeConfig(accelerator="cpu", devices=2)
    assert batch_per_process(4, RuntimeConfig()) == 4 and batch_per_process(4, two) == 2
    check_settings("ewc", training, continual)
    with pytest.raises(InputError, match="replays none.*each of the 2 training processes"):
        check_settings("ewc", training, continual, runtime=two)
    check_settings("ewc", training, continual.model_copy(update={"embedding_anchor": 0.0}), runtime=two)
    # the EWC strength counts the replayed share each process really takes: fold_in asks for it
    # with each process's part of the minibatch
    import scipy.sparse as sp

    import atlasengine.continual.strategies as strategies
    from atlasengine.continual.fisher import AccumulatedFisher
    from atlasengine.training import CellData

    asked, module = [], _module()
    real = strategies.penalty_strength

    def recorded(*args):
        asked.append(args[-1])
        return real(*args)

    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    cells = CellData(sp.csr_matrix(np.ones((8, 20))), np.zeros(8))
    for runtime, batch in ((RuntimeConfig(), 6), (RuntimeConfig(accelerator="cpu", devices=2), 3)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(strategies, "penalty_strength", recorded)
            mp.setattr(strategies, "fit", lambda *a, **k: None)  # no training: the strength is what is asked
            strategies.fold_in(module, "ewc", cells, n_old_batches=2, training=TrainingConfig(batch_size=6),
                               continual=ContinualConfig(replay_fraction=0.25),
                               fisher=AccumulatedFisher({n: torch.ones_like(p) for n, p in params.items()}, 100.0),
                               anchor=params, replay=cells, runtime=runtime)
        assert asked[-1] == batch
    config = ContinualConfig(ewc_lambda=1.0, replay_fraction=0.25)
    assert penalty_strength(config, 100, 100, True, batch_per_process(6, RuntimeConfig())) == pytest.approx(
        1 - 2 / 6)
    assert penalty_strength(config, 100, 100, True, batch_per_process(6, RuntimeConfig(accelerator="cpu",
                                                                                       devices=2))) == pytest.approx(
        1 - 1 / 3)


def test_the_evidence_scale_counts_the_query_cells_that_train_and_the_replay_share_the_sampler_draws():
    # the Laplace weight: the reference's N cells against the query cells the loss sums over, which
    # leave out the validation share; and the replayed share is what each minibatch holds
    import scipy.sparse as sp

    import atlasengine.continual.strategies as strategies
    from atlasengine.config import ContinualConfig, RuntimeConfig, TrainingConfig
    from atlasengine.continual.fisher import AccumulatedFisher
    from atlasengine.training import CellData

    asked, module = [], _module()
    real = strategies.penalty_strength
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    cells = CellData(sp.csr_matrix(np.ones((100, 20))), np.zeros(100))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(strategies, "penalty_strength", lambda *a: asked.append(a[2]) or real(*a))
        mp.setattr(strategies, "fit", lambda *a, **k: None)
        strategies.fold_in(module, "ewc", cells, n_old_batches=2, training=TrainingConfig(validation_fraction=0.1),
                           continual=ContinualConfig(replay_fraction=0.25),
                           fisher=AccumulatedFisher({n: torch.ones_like(p) for n, p in params.items()}, 900.0),
                           anchor=params, replay=cells, runtime=RuntimeConfig())
    assert asked == [90]  # 10 of the 100 query cells validate and never enter the loss
    # 2-cell minibatches at 0.75 replay hold 2 replayed cells and 1 query cell: a third of the loss
    # is the query's, so the penalty keeps a third of its weight (it fell to 0, as if all were replayed)
    third = strategies.penalty_strength(ContinualConfig(ewc_lambda=1.0, replay_fraction=0.75), 90, 90, True, 2)
    assert third == pytest.approx(1 / 3)


def test_a_create_whose_default_fold_in_could_not_run_is_refused(tmp_path, pancreas_ref):
    from conftest import TINY

    from atlasengine.errors import InputError

    path = tmp_path / "new.atlas"
    config = {**TINY, "continual": {**TINY.get("continual", {}), "replay_fraction": 0.0}}
    with pytest.raises(InputError, match="replays none"):
        Atlas.create(path, pancreas_ref, batch_key="tech", label_key="celltype", config=config)
    assert not path.exists() and list(tmp_path.iterdir()) == []
