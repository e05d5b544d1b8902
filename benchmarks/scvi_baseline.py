"""The scvi-tools baselines: scArches surgery, fine-tuning and the seed paper's CLCVAE, optional.

All use scvi-tools' own defaults unless said: ``SCVI`` with the scArches settings (layer norm,
no batch norm, encoded covariates, dropout 0.2, 2 layers of 128, 10 latent dimensions) and a
negative binomial likelihood, where scvi-tools' default is ZINB: NB is the engine's default,
so both libraries fit the same model and the parity check compares training, not likelihoods;
reference trained with ``model.train()`` as it comes (epochs min(400, 400 x 20000 / cells), no
early stopping, KL warm-up over 400 epochs, weight decay 1e-6); the query trained for 200
epochs with weight decay 0 (the scArches tutorial's setting, without which frozen batch
columns decay).

- surgery: ``SCVI.load_query_data`` with its defaults (only the new batch columns train).
- finetune: ``load_query_data(unfrozen=True)``, no penalty.
- clcvae: the paper's method (Continual single-cell architecture surgery, CLCVAE): the query
  model starts from the reference weights, every weight trains, and the loss gains
  ``lambda/2 * sum_i F_i (theta_i - theta*_i)^2`` with ``F`` the squared gradient of the
  minibatch-mean ELBO on reference cells, averaged over minibatches (their notebooks), and
  ``lambda = 1e4``; new batch columns carry no Fisher.

scvi-tools is not a dependency of atlasengine; it lives in the benchmark venv (``.venv-bench``).
Without it :func:`available` says why and the benchmarks report the baselines as unavailable.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from atlasengine.training.fit import quiet_lightning

ARCH = dict(n_latent=10, n_hidden=128, n_layers=2, dropout_rate=0.2, gene_likelihood="nb",
            use_layer_norm="both", use_batch_norm="none", encode_covariates=True)
QUERY_EPOCHS = 200
CLCVAE_LAMBDA = 1e4
SURGERY, FINETUNE, CLCVAE = "scvi-tools surgery", "scvi-tools finetune", "CLCVAE (paper, scvi-tools)"
METHODS = (SURGERY, FINETUNE, CLCVAE)
"""The scvi-tools fold-ins by the names the benchmarks' tables give them."""


def available() -> tuple[bool, str]:
    try:
        import scvi  # noqa: F401
    except Exception as exc:
        return False, f"scvi-tools not importable in {__import__('sys').executable} ({type(exc).__name__}: {exc})"
    return True, ""


def _train_kwargs(epochs: int | None) -> dict:
    return dict(max_epochs=epochs, enable_progress_bar=False, accelerator="cpu")


def train_reference(ref, batch_key: str, seed: int, epochs: int | None = None):
    """Train the SCVI reference with scvi-tools' defaults; returns (model, seconds, epochs run)."""
    import scvi

    scvi.settings.verbosity = logging.WARNING  # importing scvi sets its logger to INFO, a line per embedded AnnData
    scvi.settings.seed = seed
    ref = ref.copy()
    scvi.model.SCVI.setup_anndata(ref, batch_key=batch_key)
    model = scvi.model.SCVI(ref, **ARCH)
    t0 = time.perf_counter()
    with quiet_lightning():  # no Lightning tips or device lines in the benchmark's log, as in the engine's runs
        model.train(**_train_kwargs(epochs))
    return model, time.perf_counter() - t0, len(model.history["elbo_train"])


def _query_model(model, query, unfrozen: bool):
    import scvi

    return scvi.model.SCVI.load_query_data(query.copy(), model, unfrozen=unfrozen)


def surgery(model, query, seed: int, epochs: int = QUERY_EPOCHS):
    """Fold in with ``SCVI.load_query_data`` (frozen reference); returns (query model, seconds, epochs run)."""
    return _fit_query(_query_model(model, query, unfrozen=False), seed, epochs, {})


def finetune(model, query, seed: int, epochs: int = QUERY_EPOCHS):
    """Fold in with every weight trainable and no penalty; returns (query model, seconds, epochs run)."""
    return _fit_query(_query_model(model, query, unfrozen=True), seed, epochs, {})


def clcvae(model, ref, query, seed: int, epochs: int = QUERY_EPOCHS, ewc_lambda: float = CLCVAE_LAMBDA,
           replay_fraction: float = 0.0):
    """Fold in with the paper's EWC penalty (CLCVAE); returns (query model, seconds, epochs run).

    The Fisher is computed with ``model`` on the cells of ``ref`` before the query model exists
    (in a sequence: the current model on every cell it was trained on so far, the atlas that
    plays the reference); its seconds are included. ``replay_fraction`` r > 0: the query model also trains on
    reference cells, a seeded sample of them making r of its training cells (the paper's text
    speaks of "presenting the query model with examples from the reference"; its notebooks and
    the default here do not), as the engine's ewc replays r of every minibatch.
    """
    t0 = time.perf_counter()
    fisher = minibatch_fisher(model, ref)
    anchor = {k: v.detach().clone() for k, v in model.module.named_parameters()}
    if replay_fraction > 0:
        import anndata as ad

        n = min(ref.n_obs, round(query.n_obs * replay_fraction / (1 - replay_fraction)))
        picked = np.sort(np.random.default_rng(seed).choice(ref.n_obs, size=n, replace=False))
        query = ad.concat([query, ref[picked]], join="outer", merge="same")
    q = _query_model(model, query, unfrozen=True)
    setattr(q, "_training_plan_cls", _ewc_plan_class())  # the model's hook for its training plan
    params = dict(q.module.named_parameters())
    plan = {"fisher": {k: _pad(v, params[k]) for k, v in fisher.items() if k in params},
            "anchor": {k: _pad(v, params[k]) for k, v in anchor.items() if k in params},
            "ewc_lambda": ewc_lambda}
    q, _, n = _fit_query(q, seed, epochs, plan)
    return q, time.perf_counter() - t0, n


def fold_in(method: str, model, ref, query, seed: int, epochs: int = QUERY_EPOCHS):
    """Fold ``query`` into ``model`` by one of :data:`METHODS`; returns (query model, seconds, epochs run).

    ``ref``: the cells ``model`` was trained on, which only CLCVAE reads (its Fisher).
    """
    if method == SURGERY:
        return surgery(model, query, seed, epochs)
    if method == FINETUNE:
        return finetune(model, query, seed, epochs)
    if method == CLCVAE:
        return clcvae(model, ref, query, seed, epochs)
    raise ValueError(f"unknown scvi-tools method {method!r}; one of {METHODS}")


def _fit_query(q, seed: int, epochs: int, plan: dict):
    import scvi

    scvi.settings.seed = seed
    t0 = time.perf_counter()
    with quiet_lightning():
        q.train(**_train_kwargs(epochs), plan_kwargs={"weight_decay": 0.0, **plan})
    return q, time.perf_counter() - t0, len(q.history["elbo_train"])


def minibatch_fisher(model, adata, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Compute the diagonal Fisher as the paper's notebooks do.

    Squared gradients of the minibatch-mean loss (the ELBO, KL weight 1) over the cells of
    ``adata`` (the reference), in their order, averaged over minibatches.
    """
    module = model.module
    module.eval()
    # the cells given, set up as the model's own (a query model's registry knows every batch so far); scvi-tools
    # offers no public loader over other cells than the model's own, so its own two helpers do it
    adata = model._validate_anndata(adata.copy())  # noqa: SLF001
    loader = model._make_data_loader(adata=adata, batch_size=batch_size, shuffle=False)  # noqa: SLF001
    sums = {k: torch.zeros_like(p) for k, p in module.named_parameters()}
    n = 0
    for tensors in loader:
        module.zero_grad()
        _, _, losses = module(tensors, loss_kwargs={"kl_weight": 1.0})
        losses.loss.backward()
        for k, p in module.named_parameters():
            if p.grad is not None:
                sums[k] += p.grad.detach() ** 2
        n += 1
    module.zero_grad()
    return {k: v / max(n, 1) for k, v in sums.items()}


def _pad(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``t`` at the end of every dimension that grew (new batch columns), as load_query_data grows weights."""
    out = t.detach().clone()
    for dim in range(t.dim()):
        grow = like.shape[dim] - out.shape[dim]
        if grow > 0:
            shape = list(out.shape)
            shape[dim] = grow
            out = torch.cat([out, torch.zeros(shape, dtype=out.dtype)], dim=dim)
    return out.to(like.device)


def _ewc_plan_class():
    from scvi.train import TrainingPlan

    class EWCTrainingPlan(TrainingPlan):
        """scvi-tools' training plan plus ``lambda/2 * sum F (theta - theta*)^2`` on every step."""

        def __init__(self, module, *, fisher, anchor, ewc_lambda: float, **kwargs):
            super().__init__(module, **kwargs)
            self.ewc_terms = [(k, fisher[k], anchor[k]) for k, _ in module.named_parameters() if k in fisher]
            self.ewc_lambda = ewc_lambda

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            params = dict(self.module.named_parameters())
            penalty = sum((f.to(params[k].device) * (params[k] - a.to(params[k].device)) ** 2).sum()
                          for k, f, a in self.ewc_terms)
            return loss + 0.5 * self.ewc_lambda * penalty

    return EWCTrainingPlan


def latent(model, adata) -> np.ndarray:
    return np.asarray(model.get_latent_representation(adata.copy()), dtype=np.float32)


def label_query(model, ref, query, labels: np.ndarray):
    """Embed ``ref`` and ``query`` with ``model``; label the query by the engine's kNN over the reference cells.

    The same transfer as the engine's rows (scArches weighted kNN, k = 50, Unknown above 0.3),
    over an exact index. Returns (reference embedding, query embedding, predictions).
    """
    from atlasengine.config import TransferConfig
    from atlasengine.transfer import NeighborIndex, transfer_labels

    z_ref, z_q = latent(model, ref), latent(model, query)
    index = NeighborIndex.build(z_ref, labels, TransferConfig(index="exact"))
    preds = transfer_labels(index, z_q, TransferConfig(), obs_names=[str(c) for c in query.obs_names])
    return z_ref, z_q, preds
