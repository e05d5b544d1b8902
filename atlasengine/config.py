"""Configuration as pydantic models. Every default works on the shared data sets.

Example:
    >>> from atlasengine.config import AtlasConfig
    >>> cfg = AtlasConfig(model={"n_latent": 8})
    >>> cfg.model.n_hidden
    128
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from atlasengine.errors import InputError

FoldInStrategy = Literal["surgery", "finetune", "ewc"]
"""How a query is folded in: ``surgery`` (only new batch columns train, scArches), ``finetune``
(every weight, no penalty) or ``ewc`` (every weight under the EWC penalty, with replay)."""
STRATEGIES: tuple[str, ...] = get_args(FoldInStrategy)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Architecture of the conditional VAE (scVI with scArches settings)."""

    n_hidden: int = Field(128, ge=1)
    n_layers: int = Field(2, ge=1)
    n_latent: int = Field(10, ge=1)
    dropout_rate: float = Field(0.2, ge=0.0, lt=1.0)
    likelihood: Literal["nb", "zinb"] = "nb"


class TrainingConfig(_Strict):
    """Optimisation settings for one training run (reference or fold-in).

    The defaults follow scvi-tools' ``train()``: a fixed number of epochs by its rule, no early
    stopping, the KL term warmed up over the whole run (scvi-tools warms it up over 400 epochs,
    which is the whole run at the sizes where its rule gives 400). A 10% validation split is
    held out and its loss recorded, as scvi-tools does.
    """

    max_epochs: int | None = Field(
        None, ge=1, description="None: scvi-tools' rule, min(epochs_cap, 400 * 20000 / n_cells)")
    epochs_cap: int = Field(400, ge=1, description="the most epochs the rule gives")
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    kl_warmup_epochs: int | None = Field(
        None, ge=0, description="epochs over which the KL weight rises from 0 to 1; None: the whole run; 0: none")
    validation_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    early_stopping: bool = Field(
        False, description="stop when the validation loss has not improved for early_stopping_patience epochs")
    early_stopping_patience: int = Field(15, ge=1)
    seed: int = 0


class RuntimeConfig(_Strict):
    """Settings of the machine a run happens on; never stored in the atlas.

    ``progress``: None shows a bar per long phase when stderr is a terminal and logs one line
    per phase otherwise; True / False force the bar on or off. ``devices`` above 1 trains with
    data parallelism in that many processes (``strategy``).
    """

    accelerator: str = "auto"
    devices: int | str = 1
    progress: bool | None = None
    strategy: Literal["auto", "ddp_fork", "ddp_spawn"] = Field(
        "auto",
        description="how several devices train: 'auto' is Lightning's single-device loop for devices=1, and "
        "above it 'ddp_fork' for cells in memory and 'ddp_spawn' for a streamed input; both are Lightning's "
        "DistributedDataParallel (gloo on CPU, NCCL on GPUs) in processes that only train, so only this process "
        "runs the calling script and writes the atlas. 'ddp_fork' forks them from this one (nothing is copied; "
        "refused with a streamed input: TileDB reads hang in forked processes); 'ddp_spawn' starts fresh "
        "interpreters that open the cell store themselves (a calling script needs the "
        "`if __name__ == '__main__':` guard)",
    )
    block_cells: int = Field(
        65_536, ge=1,
        description="cells read from the cell store at a time when a streamed input (a backed AnnData or a "
        "SomaInput) trains: minibatches are shuffled within blocks of this many cells, blocks in random order "
        "(a block of 65,536 cells of 500 non-zeros holds about 260 MB)",
    )


class ContinualConfig(_Strict):
    """How a query is folded in: penalty strength, replay and Fisher estimation.

    The EWC penalty is ``ewc_lambda * (1 - r) * N / n_query * 1/2 * sum F (theta - theta*)^2``
    with ``F`` the per-cell-mean Fisher of the ``N`` cells the atlas represents, ``r`` the
    replayed share of a minibatch and ``n_query`` the cells being folded in that train, the
    validation share left out (``penalty_scale="evidence"``; see :func:`atlasengine.continual.strategies.penalty_strength`).
    ``ewc_lambda = 1`` is the Laplace weight: the reference counts as the cells it was estimated on.

    The defaults, ``ewc_lambda = 1`` with ``embedding_anchor = 1000``, hold the reference mostly in
    the embedding: the replayed reference cells' embeddings are held where the current version puts
    them (:class:`atlasengine.continual.anchor.EmbeddingAnchor`), beside a weak EWC penalty at the
    Laplace weight. They replaced ``ewc_lambda = 100`` without the anchor (picked by
    ``python -m benchmarks.lambda_sweep``, 'EWC strength sweep' in ``benchmarks/RESULTS.md``) by a
    rule written before the runs (commit 91c243c; the page's notes): on mapping seeds 3-5 and
    over the two sequences they meet every part of the method's checks the penalty alone met, and
    more (13 of 18 against 9); they name the README's new type on more seeds (5 of 5 against 3) and
    label more of kang's next donor's FCGR3A+ monocytes with their new name (54% against 14%). The
    cost: the reference moves a little more over kang's five donors (0.19 of finetune's drift
    against 0.11) and pancreas' new type is found a little less well (AUROC 0.935 against 0.946). The penalty alone
    keeps new types beside known ones, because the encoder weights a new type needs are those
    with high Fisher; holding the replayed cells' places instead leaves the encoder free elsewhere.
    ``continual={"ewc_lambda": 100, "embedding_anchor": 0}`` is the previous default.
    ``replay_fraction = 0.25``: a quarter of every minibatch is reference cells replayed from the
    atlas (an epoch holds ``n_query / (1 - r)`` cells); the anchor acts on those cells, so it needs
    replay. ``fisher_posterior`` adds the Fisher information of the encoder's q(z | x), which holds
    the embedding a little more at the same lambda for a slightly lower AUROC ('EWC strength
    sweep'); it is off by default. An atlas keeps the settings it was created with: one created
    before this default folds in with lambda 100 and no anchor unless an ingest says otherwise.
    """

    ewc_lambda: float = Field(1.0, ge=0, description="strength of the EWC penalty (see penalty_scale)")
    penalty_scale: Literal["evidence", "fixed"] = Field(
        "evidence",
        description="'evidence': ewc_lambda multiplies the Laplace weight, the reference counting as the cells its "
        "Fisher was estimated on (N / n_query); 'fixed': ewc_lambda is the weight itself, whatever the sizes",
    )
    replay_fraction: float = Field(0.25, ge=0.0, lt=1.0)
    replay_max_cells: int = Field(10_000, ge=0)
    fisher_max_cells: int = Field(2_000, ge=1)
    fisher_chunk_size: int = Field(256, ge=1)
    fisher_gamma: float = Field(1.0, ge=0.0)
    fisher_posterior: bool = Field(
        False,
        description="add to the encoder's Fisher the Fisher information of the posterior q(z | x): the penalty then "
        "also holds the reference cells' embeddings, not only their ELBO",
    )
    embedding_anchor: float = Field(
        1000.0, ge=0.0,
        description="ewc only: weight of a second penalty that holds the replayed reference cells' embeddings (posterior "
        "means) where the current version puts them, embedding_anchor * sum over the minibatch's replayed cells of "
        "|mean_new - mean_now|^2 / minibatch size; it holds the reference in the embedding, not in the weights. 0: off; "
        "1000, the default, was picked on seed 0 of three scenarios (lambda_sweep --grid anchor). Measured beside the "
        "EWC penalty in benchmarks/RESULTS.md (section 'Holding the embedding instead of the weights'); with "
        "ewc_lambda=0 it is replay with the embedding held and no EWC penalty; it needs replay",
    )
    min_gene_overlap: float = Field(0.8, gt=0.0, le=1.0)


class TransferConfig(_Strict):
    """Weighted kNN label transfer (scArches) and the Unknown cut-off.

    ``index="auto"``: exact search (faiss IndexFlatL2) up to ``approximate_above`` labelled
    reference cells, an IVF index above. Timings on a 100k x 10-d reference, 10k queries, k = 50
    (``python -m benchmarks.speed``) are measured in ``benchmarks/RESULTS.md`` (section 'Speed',
    label transfer): IVF searches far faster than exact search and than scikit-learn's
    NearestNeighbors, is built once per version in a fraction of a second, and almost all of its
    labels equal those of exact search; HNSW searches fast too but takes much longer to build,
    the more so at 1M cells, hence IVF.
    """

    k: int = Field(50, ge=1)
    kernel: Literal["scarches", "gaussian"] = "scarches"
    uncertainty_threshold: float = Field(0.3, ge=0.0, le=1.0)
    unknown_rule: Literal["uncertainty", "novelty"] = Field(
        "novelty",
        description="'novelty' (default): Unknown when the calibrated novelty score is above its threshold for "
        "novelty_target; 'uncertainty': Unknown when uncertainty > uncertainty_threshold (the paper's and scArches' "
        "rule); the two are compared on six scenarios in benchmarks/RESULTS.md (section 'Novelty rules side by side'). "
        "Atlases made before format 7 keep the rule they stored",
    )
    novelty_target: float = Field(0.05, gt=0.0, lt=1.0, description="target share of known cells called novel")
    novelty_k: int = Field(
        10, ge=1,
        description="the novelty score's distance signal: mean distance to this many nearest reference cells "
        "(10: measured against 20 and 50 in benchmarks/novelty.py; see atlasengine.transfer.novelty.DEFAULT_K)",
    )
    novelty_smoothing: int = Field(
        10, ge=1,
        description="the novelty distance and uncertainty are averaged over the cell's this many nearest cells of "
        "its own batch (query cells among the query's cells, calibration cells among all reference cells; batches "
        "under 4 times this many cells pooled) before their p-values; 1 = no "
        "averaging (atlases upgraded from format 6 keep 1). See atlasengine.transfer.novelty.DEFAULT_SMOOTHING",
    )
    novelty_calibration: Literal["query", "reference"] = Field(
        "query",
        description="'query': the novelty statistic moved by the query's shift from the reference (the median "
        "difference over all query cells, kept within the quartiles of the per-label differences) before the "
        "conformal threshold, so a query shifted as a whole (another chemistry, a stimulation) keeps the target while "
        "a new type landing in a few labels does not move it; falls back to 'reference' when fewer than 3 predicted "
        "labels hold 10 query cells. "
        "'reference': p-values against reference cells only (exact when known query cells are exchangeable with "
        "them)",
    )
    index: Literal["auto", "exact", "hnsw", "ivf"] = "auto"
    approximate_above: int = Field(50_000, ge=1)
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef_search: int = Field(128, ge=1)
    ivf_nlist: int = Field(1024, ge=1)
    ivf_nprobe: int = Field(32, ge=1)


class DriftConfig(_Strict):
    """Neighbourhood size and flag thresholds of drift tracking."""

    k: int = Field(15, ge=1)
    max_cells: int = Field(20_000, ge=100)
    flag_mean_displacement_aligned: float = Field(0.5, ge=0)
    flag_knn_preservation_min: float = Field(0.5, ge=0, le=1)
    flag_label_accuracy_drop: float = Field(0.05, ge=0, le=1)
    flag_ilisi_norm_drop: float = Field(
        0.1, ge=0, le=1,
        description="batch mixing: the largest fall of the normalised iLISI below version 1's before the "
        "report marks the check red (the report's own check; drift_flags records the other three)",
    )


class AtlasConfig(_Strict):
    """Everything an atlas needs; stored in its manifest."""

    model: ModelConfig = ModelConfig()
    reference_training: TrainingConfig = TrainingConfig()
    query_training: TrainingConfig = TrainingConfig(epochs_cap=200, kl_warmup_epochs=0)
    continual: ContinualConfig = ContinualConfig()
    transfer: TransferConfig = TransferConfig()
    drift: DriftConfig = DriftConfig()

    @model_validator(mode="before")
    @classmethod
    def _sections_override_defaults(cls, data: Any) -> Any:
        """Fill the sections given as dicts or models with the atlas's own defaults for the keys they do not name.

        A section given as a dict, or as a model (``TrainingConfig(max_epochs=2)``), changes only
        the keys it names: the atlas's own defaults for that section (e.g. no KL warm-up and at
        most 200 epochs in ``query_training``) stay, as :func:`merged` does for an ingest's settings.
        """
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, field in cls.model_fields.items():
            given = data.get(name)
            if isinstance(given, BaseModel) and isinstance(field.default, type(given)):
                if field.default == type(given)():  # the atlas's default is the model's own: keep the object as given
                    continue
                given = given.model_dump(exclude_unset=True)
            if isinstance(given, dict) and isinstance(field.default, BaseModel):
                data[name] = {**field.default.model_dump(), **given}
        return data


def validation_problems(exc: ValidationError, model: str) -> str:
    """Return pydantic's errors on one line, each naming its setting (``section.key: problem (got value)``).

    Example
    -------
    >>> try:
    ...     AtlasConfig.model_validate({"model": {"n_hidden": 0}})
    ... except ValidationError as exc:
    ...     print(validation_problems(exc, "AtlasConfig"))
    model.n_hidden: Input should be greater than or equal to 1 (got 0)
    """
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or model
        problems.append(f"{where}: {error['msg']} (got {repr(error.get('input'))[:60]})")
    return "; ".join(problems)


def merged(base: BaseModel, override: BaseModel | dict | None) -> BaseModel:
    """Return ``base`` with the keys of ``override`` changed.

    An instance of the same model changes the fields it was given (``model_fields_set``), so
    ``training=TrainingConfig(max_epochs=2)`` means two epochs with the atlas's other settings,
    as ``{"max_epochs": 2}`` does.

    Example
    -------
    >>> merged(TrainingConfig(kl_warmup_epochs=0), {"seed": 3}).kl_warmup_epochs
    0
    >>> merged(TrainingConfig(kl_warmup_epochs=0), TrainingConfig(seed=3)).kl_warmup_epochs
    0
    """
    if override is None:
        return base
    if isinstance(override, type(base)):
        override = override.model_dump(exclude_unset=True)
    if not isinstance(override, dict):
        raise InputError(f"expected {type(base).__name__} or dict, got {type(override).__name__}")
    try:
        return type(base).model_validate({**base.model_dump(), **override})
    except ValidationError as exc:
        raise InputError(f"invalid {type(base).__name__}: {validation_problems(exc, type(base).__name__)}") from exc
