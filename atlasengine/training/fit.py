"""Run a training plan with Lightning's Trainer (accelerator chosen by Lightning)."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping
from torch import nn

from atlasengine.config import TrainingConfig
from atlasengine.errors import TrainingError
from atlasengine.training.data import CellData, make_loaders
from atlasengine.training.plan import Penalty, TrainingPlan


@dataclass
class TrainResult:
    """What a training run did: epochs run, wall time, per-epoch losses."""

    epochs: int
    seconds: float
    cells_per_second: float
    device: str = "cpu"
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        last = self.history[-1] if self.history else {}
        return {
            "epochs": self.epochs,
            "seconds": round(self.seconds, 3),
            "cells_per_second": round(self.cells_per_second, 1),
            "device": self.device,
            **{f"final_{k}": round(v, 4) for k, v in last.items() if k != "epoch"},
        }


def default_epochs(n_cells: int) -> int:
    """scvi-tools' rule: small data sets get more passes, capped at 400."""
    return int(min(400, round(20_000 / max(n_cells, 1) * 400)))


def fit(
    module: nn.Module,
    query: CellData,
    config: TrainingConfig,
    replay: CellData | None = None,
    replay_fraction: float = 0.0,
    penalty: Penalty | None = None,
) -> TrainResult:
    """Train ``module`` in place on ``query`` (mixed with ``replay`` cells) and return the run's record.

    Raises ``TrainingError`` when the loss stops being finite.
    """
    L.seed_everything(config.seed, workers=False, verbose=False)
    train, val = make_loaders(query, replay, config.batch_size, replay_fraction, config.validation_fraction, config.seed)
    module.train()  # dropout on; Lightning keeps whatever mode the module is in
    plan = TrainingPlan(module, config, penalty)
    callbacks = []
    if config.early_stopping and val is not None:
        callbacks.append(EarlyStopping(monitor="val_loss", patience=config.early_stopping_patience, mode="min"))
    trainer = L.Trainer(
        max_epochs=config.max_epochs or default_epochs(len(query)),
        accelerator=config.accelerator,
        devices=config.devices,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=config.progress_bar,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if val is not None else 0,
        gradient_clip_val=None,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
        try:
            trainer.fit(plan, train_dataloaders=train, val_dataloaders=val)
        except TrainingError:
            raise
        except Exception as exc:
            raise TrainingError(f"training failed: {exc}") from exc
    seconds = time.perf_counter() - start
    device = str(next(module.parameters()).device)
    module.cpu().eval()
    epochs = len(plan.history)
    cells = epochs * len(train.sampler) * (train.sampler.n_q_per + train.sampler.n_rep_per)
    return TrainResult(epochs, seconds, cells / max(seconds, 1e-9), device, plan.history)
