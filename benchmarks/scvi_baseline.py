"""The scvi-tools baseline (scArches surgery with ``SCVI.load_query_data``), optional.

scvi-tools is not a dependency of atlasengine; it lives in the benchmark venv
(``.venv-bench``). Without it :func:`available` says why and the benchmarks report the
baseline as unavailable.
"""

from __future__ import annotations

import time

import numpy as np

ARCH = dict(n_latent=10, n_hidden=128, n_layers=2, dropout_rate=0.2, gene_likelihood="nb",
            use_layer_norm="both", use_batch_norm="none", encode_covariates=True)


def available() -> tuple[bool, str]:
    try:
        import scvi  # noqa: F401
    except Exception as exc:
        return False, f"scvi-tools not importable in {__import__('sys').executable} ({type(exc).__name__}: {exc})"
    return True, ""


def _train_kwargs(epochs: int, early_stopping: bool = True) -> dict:
    return dict(max_epochs=epochs, batch_size=128, train_size=0.9, early_stopping=early_stopping,
                early_stopping_patience=15, enable_progress_bar=False, accelerator="cpu")


def train_reference(ref, batch_key: str, seed: int, epochs: int, early_stopping: bool = True):
    """SCVI reference model (scArches settings, KL warm-up 20 epochs like ours); (model, seconds, epochs run)."""
    import scvi

    scvi.settings.seed = seed
    ref = ref.copy()
    scvi.model.SCVI.setup_anndata(ref, batch_key=batch_key)
    model = scvi.model.SCVI(ref, **ARCH)
    t0 = time.perf_counter()
    model.train(**_train_kwargs(epochs, early_stopping), plan_kwargs={"n_epochs_kl_warmup": 20})
    return model, time.perf_counter() - t0, len(model.history["elbo_train"])


def fold_in(model, query, seed: int, epochs: int, early_stopping: bool = True):
    """Fold in with ``SCVI.load_query_data`` (frozen reference, new batch columns train).

    Trained with weight decay 0 and no KL warm-up (like our query training); returns (query
    model, seconds, epochs run).
    """
    import scvi

    scvi.settings.seed = seed
    query = query.copy()
    t0 = time.perf_counter()
    q_model = scvi.model.SCVI.load_query_data(query, model)
    q_model.train(**_train_kwargs(epochs, early_stopping), plan_kwargs={"weight_decay": 0.0, "n_epochs_kl_warmup": 0})
    return q_model, time.perf_counter() - t0, len(q_model.history["elbo_train"])


def latent(model, adata) -> np.ndarray:
    return np.asarray(model.get_latent_representation(adata.copy()), dtype=np.float32)
