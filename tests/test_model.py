"""The torch model and the continual-learning pieces, checked against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from atlasengine.config import ModelConfig
from atlasengine.continual import AccumulatedFisher, EWCPenalty, diagonal_fisher
from atlasengine.model import CVAE
from atlasengine.model.likelihood import log_nb, log_nb_per_cell
from atlasengine.training import CellData


def test_nb_log_likelihood_matches_torch_distribution():
    x = torch.tensor([[0.0, 3.0, 10.0]])
    mu = torch.tensor([[1.5, 2.0, 8.0]])
    theta = torch.tensor([0.7, 3.0, 12.0])
    # torch's NegativeBinomial: total_count = theta, probs = mu / (mu + theta)
    ref = torch.distributions.NegativeBinomial(total_count=theta, probs=mu / (mu + theta)).log_prob(x)
    torch.testing.assert_close(log_nb(x, mu, theta), ref, rtol=1e-4, atol=1e-4)


def test_sparse_per_cell_nb_equals_dense_sum_with_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.full((6, 40), 0.7), generator=g)  # mostly zeros, like counts
    mu = torch.rand(6, 40, generator=g) * 3 + 0.1
    log_r = torch.randn(40, generator=g).requires_grad_(True)
    dense = log_nb(x, mu, torch.exp(log_r)).sum(-1)
    (gd,) = torch.autograd.grad(dense.sum(), log_r)
    sparse = log_nb_per_cell(x, mu, torch.exp(log_r).expand(6, -1))
    (gs,) = torch.autograd.grad(sparse.sum(), log_r)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gs, gd, rtol=1e-5, atol=1e-4)


def test_add_batches_keeps_weights_and_outputs():
    torch.manual_seed(0)
    m = CVAE(30, 2, ModelConfig(n_hidden=16, n_latent=4))
    x = torch.poisson(torch.full((5, 30), 3.0))
    b = torch.tensor([0, 1, 0, 1, 1])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    z_before = m.latent(x, b)
    m.add_batches(3)
    assert m.n_batches == 5
    for k, v in m.state_dict().items():
        old = before[k]
        torch.testing.assert_close(v[: old.shape[0]], old, rtol=0, atol=0)
    torch.testing.assert_close(m.latent(x, b), z_before, rtol=0, atol=0)


def test_new_batch_rows_go_where_the_model_is():
    # the meta device stands in for a GPU: a model away from the CPU gains rows on its own device
    m = CVAE(30, 2, ModelConfig(n_hidden=16, n_latent=4)).to("meta")
    m.add_batches(2, seed=0)
    assert m.n_batches == 4
    assert {p.device.type for p in m.parameters()} == {"meta"}


def test_unknown_batch_means_zero_batch_input():
    m = CVAE(20, 2, ModelConfig(n_hidden=8, n_latent=3))
    x = torch.poisson(torch.full((4, 20), 2.0))
    with torch.no_grad():
        for mod in m.modules():
            if hasattr(mod, "batch_weight"):
                mod.batch_weight[0] = 0.0
    torch.testing.assert_close(m.latent(x, torch.full((4,), -1)), m.latent(x, torch.zeros(4, dtype=torch.long)))


def test_per_cell_fisher_equals_mean_of_squared_single_cell_gradients():
    torch.manual_seed(1)
    m = CVAE(25, 2, ModelConfig(n_hidden=8, n_latent=3))
    counts = np.random.default_rng(0).poisson(2.0, size=(12, 25)).astype(np.float32)
    data = CellData(sp.csr_matrix(counts), np.array([0, 1] * 6))
    fisher = diagonal_fisher(m, data, max_cells=100, chunk_size=5, seed=3)
    # oracle: one backward pass per cell with the same noise
    m.eval()
    gen = torch.Generator().manual_seed(3)
    eps_all = torch.cat([torch.randn(len(r), 3, generator=gen) for r in np.array_split(np.arange(12), [5, 10])])
    expected = {k: torch.zeros_like(p) for k, p in m.named_parameters()}
    for i in range(12):
        m.zero_grad()
        out = m.loss(torch.from_numpy(counts[i : i + 1]), torch.tensor([i % 2]), eps=eps_all[i : i + 1])
        out.per_cell.sum().backward()
        for k, p in m.named_parameters():
            expected[k] += p.grad.pow(2) / 12
    for k in expected:
        torch.testing.assert_close(fisher[k], expected[k], rtol=1e-3, atol=1e-5)


def test_posterior_fisher_adds_the_squared_score_of_q_for_encoder_weights_only():
    torch.manual_seed(2)
    m = CVAE(20, 2, ModelConfig(n_hidden=8, n_latent=3))
    counts = np.random.default_rng(1).poisson(2.0, size=(9, 20)).astype(np.float32)
    data = CellData(sp.csr_matrix(counts), np.array([0, 1, 1] * 3))
    elbo = diagonal_fisher(m, data, max_cells=100, chunk_size=4, seed=5)
    both = diagonal_fisher(m, data, max_cells=100, chunk_size=4, seed=5, posterior=True)
    m.eval()
    gen = torch.Generator().manual_seed(5)
    eps_all = torch.cat([torch.randn(len(r), 3, generator=gen) for r in np.array_split(np.arange(9), [4, 8])])
    expected = {k: torch.zeros_like(p) for k, p in m.named_parameters()}
    for i in range(9):  # oracle: one backward of -log q(z_i | x_i) per cell, z_i held fixed
        m.zero_grad()
        out = m.loss(torch.from_numpy(counts[i : i + 1]), torch.tensor([data.batch[i]]), eps=eps_all[i : i + 1])
        (-out.posterior_log_prob()).sum().backward()
        for k, p in m.named_parameters():
            if p.grad is not None:
                expected[k] += p.grad.pow(2) / 9
    for k in expected:
        torch.testing.assert_close(both[k] - elbo[k], expected[k], rtol=1e-3, atol=1e-5)
        if k.startswith(("decoder", "px_")):
            assert float(expected[k].abs().max()) == 0.0, k


def test_online_fisher_adds_evidence_in_cells_and_pads_new_batch_rows():
    old = AccumulatedFisher({"w": torch.ones(2, 3), "b": torch.ones(3)}, cells=300.0)
    new = {"w": torch.full((4, 3), 2.0), "b": torch.full((3,), 2.0)}
    acc = old.add(new, n_new=100, gamma=0.5)  # 150 old cells' worth + 100 new
    assert acc.cells == 250.0
    # precision (cells x per-cell mean) adds up: 150 * 1 + 100 * 2 = 350 over 250 cells
    torch.testing.assert_close(acc.mean["w"][:2], torch.full((2, 3), 350 / 250))
    torch.testing.assert_close(acc.mean["b"], torch.full((3,), 350 / 250))
    # new batch rows: only the new cells carry evidence for them
    torch.testing.assert_close(acc.mean["w"][2:], torch.full((2, 3), 200 / 250))


def test_ewc_penalty_value_and_new_rows_are_free():
    m = CVAE(10, 2, ModelConfig(n_hidden=4, n_latent=2))
    anchor = {k: v.detach().clone() for k, v in m.named_parameters()}
    fisher = {k: torch.full_like(v, 2.0) for k, v in anchor.items()}
    m.add_batches(1)
    pen = EWCPenalty(m, fisher, anchor, ewc_lambda=10.0)
    assert float(pen(m).detach()) == 0.0
    with torch.no_grad():
        m.encoder.layers[0].batch_weight[2] += 5.0  # a new batch row: zero Fisher
    assert float(pen(m).detach()) == 0.0
    with torch.no_grad():
        m.px_r[0] += 0.5
    # lambda/2 * F * d^2 = 5 * 2 * 0.25
    assert float(pen(m).detach()) == pytest.approx(2.5, rel=1e-5)


def test_ewc_penalty_gradient_equals_autograd_of_its_formula():
    torch.manual_seed(0)
    m = CVAE(10, 2, ModelConfig(n_hidden=4, n_latent=2))
    fisher = {k: torch.rand_like(v) for k, v in m.named_parameters()}
    anchor = {k: v.detach() + 0.1 * torch.randn_like(v) for k, v in m.named_parameters()}
    pen = EWCPenalty(m, fisher, anchor, ewc_lambda=7.0)
    value = pen(m)
    value.backward()
    fast = {k: v.grad.clone() for k, v in m.named_parameters()}
    m.zero_grad()
    naive = 3.5 * sum((fisher[k] * (v - anchor[k]) ** 2).sum() for k, v in m.named_parameters())
    naive.backward()
    assert float(value.detach()) == pytest.approx(float(naive.detach()), rel=1e-5)
    for k, v in m.named_parameters():
        torch.testing.assert_close(fast[k], v.grad)


def test_latent_leaves_the_model_in_train_mode_when_encoding_fails():
    model = CVAE(20, 2, ModelConfig(n_latent=3, n_hidden=8)).train()
    with pytest.raises(RuntimeError):
        model.latent(torch.zeros(4, 7), torch.zeros(4, dtype=torch.long))  # 7 genes for a 20-gene model
    assert model.training
