"""The three fold-in strategies, as settings on a module that starts from the current weights.

- ``surgery``: only the new batch rows of the covariate layers train (scArches); every old
  weight stays bit-identical (zeroed gradients with Adam and no weight decay give zero updates).
- ``finetune``: every weight trains, no penalty.
- ``ewc``: every weight trains under the EWC penalty, with replayed reference cells (and,
  where ``embedding_anchor`` > 0, the replayed cells' embeddings held too; at ``ewc_lambda`` 0
  the penalty is left out).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from atlasengine.config import STRATEGIES, ContinualConfig, FoldInStrategy, RuntimeConfig, TrainingConfig
from atlasengine.continual.anchor import EmbeddingAnchor
from atlasengine.continual.ewc import EWCPenalty
from atlasengine.continual.fisher import AccumulatedFisher, Tensors
from atlasengine.errors import InputError
from atlasengine.model import CVAE
from atlasengine.training import (
    CellData,
    CellSource,
    TrainResult,
    batch_per_process,
    fit,
    minibatch_split,
    trained_cells,
    training_processes,
)
from atlasengine.training.plan import Penalty

__all__ = ["STRATEGIES", "FoldInStrategy", "NewBatchRowsOnly", "PenaltySum", "check_settings", "fold_in",
           "surgery_mode"]


class PenaltySum:
    """Several penalties as one: ``sum(p(module, x, batch) for p in penalties)`` (picklable, for spawned processes)."""

    def __init__(self, *penalties: Penalty) -> None:
        self.penalties = penalties

    def __call__(self, module: torch.nn.Module, x: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Return the sum of the penalties on this minibatch."""
        return sum((p(module, x, batch) for p in self.penalties[1:]), self.penalties[0](module, x, batch))

    @classmethod
    def of(cls, penalties: list[Penalty]) -> Penalty | None:
        """Return one penalty for ``penalties``: None for none, the penalty itself for one, else their sum."""
        if len(penalties) < 2:
            return penalties[0] if penalties else None
        return cls(*penalties)


class NewBatchRowsOnly:
    """Surgery's gradient filter: zeroes the old batch rows' gradients of the batch-covariate weights.

    Called by the training plan after every backward pass (after DDP has averaged the
    gradients). A plain object rather than a tensor hook, so it travels to spawned training
    processes (torch drops tensor hooks when it pickles a parameter).

    Example
    -------
    >>> from atlasengine.model import CVAE
    >>> m = CVAE(n_genes=5, n_batches=3)
    >>> m.loss(torch.ones(2, 5), torch.tensor([0, 2])).loss.backward()
    >>> NewBatchRowsOnly(m.batch_parameter_names(), 2)(m)
    >>> all(p.grad[:2].abs().sum() == 0 for n, p in m.named_parameters() if n in m.batch_parameter_names())
    True
    """

    def __init__(self, names: list[str], n_old_batches: int) -> None:
        self.names, self.n_old_batches = list(names), n_old_batches

    def __call__(self, module: torch.nn.Module) -> None:
        """Zero the gradient rows ``< n_old_batches`` of the named parameters."""
        params = dict(module.named_parameters())
        for name in self.names:
            grad = params[name].grad
            if grad is not None:
                grad[: self.n_old_batches] = 0


@contextmanager
def surgery_mode(module: CVAE, n_old_batches: int) -> Iterator[NewBatchRowsOnly]:
    """Freeze everything but the batch-covariate weights; yield the filter that keeps their old rows; restore on exit.

    The old rows stay fixed only where the yielded :class:`NewBatchRowsOnly` is applied after
    each backward pass (``fit(..., gradient_filter=...)`` does). Earlier, this context registered
    tensor hooks instead, which torch drops when it pickles a parameter for a spawned training
    process.
    """
    batch_names = set(module.batch_parameter_names())
    saved = {n: p.requires_grad for n, p in module.named_parameters()}
    try:
        for name, p in module.named_parameters():
            p.requires_grad_(name in batch_names)
        yield NewBatchRowsOnly(sorted(batch_names), n_old_batches)
    finally:
        for name, p in module.named_parameters():
            p.requires_grad_(saved[name])


def fold_in(
    module: CVAE,
    strategy: FoldInStrategy,
    query: CellSource,
    *,
    n_old_batches: int,
    training: TrainingConfig,
    continual: ContinualConfig,
    fisher: AccumulatedFisher | None = None,
    anchor: Tensors | None = None,
    replay: CellData | None = None,
    runtime: RuntimeConfig | None = None,
) -> TrainResult:
    """Train ``module`` (the current weights, new batch columns added) on ``query`` by ``strategy``.

    Parameters
    ----------
    module
        Starts from the current version's weights; trained in place.
    strategy
        ``"surgery"``, ``"finetune"`` or ``"ewc"``.
    query
        The new cells, batch indices in the grown model.
    n_old_batches
        Batch columns the current version already had (surgery keeps them).
    training, continual
        Optimisation settings, and the penalty strength and replay share.
    fisher, anchor
        The accumulated Fisher (with the cells it represents) and anchor weights (ewc only).
    replay
        Reference cells replayed in every minibatch (ewc only; ``continual.embedding_anchor`` holds
        their embeddings where ``module`` puts them before training).
    runtime
        Accelerator and progress display.

    Returns
    -------
    TrainResult
        What the training did.
    """
    name = f"training ({strategy})"
    if strategy == "surgery":
        with surgery_mode(module, n_old_batches) as keep_old_rows:
            return fit(module, query, training.model_copy(update={"weight_decay": 0.0}), gradient_filter=keep_old_rows,
                       runtime=runtime, name=name)
    if strategy == "finetune":
        return fit(module, query, training, runtime=runtime, name=name)
    if strategy == "ewc":
        if fisher is None or anchor is None:
            raise InputError("the ewc strategy needs the current version's Fisher and anchor weights")
        strength = penalty_strength(continual, fisher.cells, trained_cells(len(query), training.validation_fraction),
                                    replay is not None and len(replay) > 0, batch_per_process(training.batch_size, runtime))
        penalties = [EWCPenalty(module, fisher.mean, anchor, strength)] if strength > 0 else []
        if continual.embedding_anchor > 0:
            check_settings(strategy, training, continual, replayed=0 if replay is None else len(replay),
                           runtime=runtime)
            penalties.append(EmbeddingAnchor(module, n_old_batches, continual.embedding_anchor))
        return fit(module, query, training, replay=replay, replay_fraction=continual.replay_fraction,
                   penalty=PenaltySum.of(penalties), runtime=runtime, name=name)
    raise InputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


def check_settings(strategy: FoldInStrategy, training: TrainingConfig, continual: ContinualConfig,
                   replayed: int | None = None, runtime: RuntimeConfig | None = None) -> None:
    """Refuse settings a fold-in cannot honour, before anything is read or written.

    ``replayed``: how many reference cells the fold-in replays, where already known. ``runtime``:
    the processes the training runs in, each of which replays its own share of every minibatch.

    Example
    -------
    >>> from atlasengine.config import ContinualConfig, TrainingConfig
    >>> check_settings("ewc", TrainingConfig(), ContinualConfig(embedding_anchor=10.0, replay_fraction=0.0))
    Traceback (most recent call last):
    ...
    atlasengine.errors.InputError: embedding_anchor holds the replayed reference cells' embeddings, and this fold-in replays none: set replay_fraction and replay_max_cells above 0, or embedding_anchor to 0
    """
    if strategy != "ewc" or continual.embedding_anchor == 0:
        return
    per_process = batch_per_process(training.batch_size, runtime)
    if continual.replay_max_cells == 0 or minibatch_split(per_process, continual.replay_fraction)[1] == 0 or replayed == 0:
        processes = training_processes(runtime)
        where = (f" (each of the {processes} training processes takes {per_process} cells of every minibatch)"
                 if processes > 1 else "")
        raise InputError("embedding_anchor holds the replayed reference cells' embeddings, and this fold-in replays "
                         f"none{where}: set replay_fraction and replay_max_cells above 0, or embedding_anchor to 0")


def penalty_strength(
    config: ContinualConfig, represented_cells: float, n_query: int, replaying: bool, batch_size: int
) -> float:
    """Return the multiplier of ``1/2 * sum F (theta - theta*)^2`` added to the per-cell-mean minibatch loss.

    ``penalty_scale="evidence"``: the reference counts as the cells its Fisher was estimated on.
    In the Laplace reading of EWC the log-likelihood of ``N`` reference cells around the anchor
    has precision ``N * F`` (``F`` a per-cell mean); the minibatch loss is a mean over its cells,
    of which a share ``1 - r`` are query cells when a share ``r`` is replayed (the sampler's
    :func:`~atlasengine.training.minibatch_split` of ``batch_size``), so the penalty that keeps
    the two in proportion is ``lambda * (1 - r) * N / n_query``, ``n_query`` the query cells
    that train (the validation share left out: :func:`~atlasengine.training.trained_cells`).
    ``ewc_lambda = 1`` is the Laplace weight. ``penalty_scale="fixed"``: ``lambda`` itself, whatever the sizes (the
    paper's form and this engine's before format 4).

    Example
    -------
    >>> from atlasengine.config import ContinualConfig
    >>> penalty_strength(ContinualConfig(ewc_lambda=2.0, replay_fraction=0.25), 3000, 1000, True, 128)
    4.5
    >>> penalty_strength(ContinualConfig(ewc_lambda=2.0, penalty_scale="fixed"), 3000, 1000, True, 128)
    2.0
    """
    if config.penalty_scale == "fixed":
        return float(config.ewc_lambda)
    query_cells, replayed_cells = minibatch_split(batch_size, config.replay_fraction if replaying else 0.0)
    replayed = replayed_cells / (query_cells + replayed_cells)
    return float(config.ewc_lambda * (1.0 - replayed) * represented_cells / max(n_query, 1))
