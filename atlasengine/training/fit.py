"""Run a training plan with Lightning's Trainer; embed cells with a trained model.

Lightning runs the loop, picks the accelerator and owns multi-device strategies; what it prints
by itself (tips, "GPU available" lines, its per-epoch bar) is kept out of a normal run: the
engine shows one bar, or one log line, for the whole training phase.
"""

from __future__ import annotations

import ast
import atexit
import gc
import inspect
import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from torch import nn

from atlasengine.config import RuntimeConfig, TrainingConfig
from atlasengine.errors import InputError, TrainingError
from atlasengine.faults import fault_point
from atlasengine.progress import Phase, phase
from atlasengine.training.data import CellData, CellSource, iter_chunks, make_loaders
from atlasengine.training.plan import GradientFilter, Penalty, TrainingPlan

_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")


@dataclass
class TrainResult:
    """What a training run did: epochs run, wall time, per-epoch losses."""

    epochs: int
    seconds: float
    cells_per_second: float
    device: str = "cpu"
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Epochs, seconds, throughput, device and the last epoch's losses (JSON-ready)."""
        last = self.history[-1] if self.history else {}
        return {
            "epochs": self.epochs,
            "seconds": round(self.seconds, 3),
            "cells_per_second": round(self.cells_per_second, 1),
            "device": self.device,
            **{f"final_{k}": round(v, 4) for k, v in last.items() if k != "epoch"},
        }


def default_epochs(n_cells: int, cap: int = 400) -> int:
    """Return scvi-tools' rule: small data sets get more passes, at most ``cap`` (400 in scvi-tools)."""
    return int(max(1, min(cap, round(20_000 / max(n_cells, 1) * 400))))


def _advance_per_epoch(progress: Phase) -> Callable[[dict[str, float]], None]:
    def on_epoch(row: dict[str, float]) -> None:
        progress.advance(1, **{k: v for k, v in row.items() if k in ("train_loss", "val_loss", "penalty")})

    return on_epoch


def _silence_lightning() -> None:
    """Raise Lightning's loggers to errors and ignore its warnings and data-loader advice in this process."""
    for name in _LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning(\.|$)")
    warnings.filterwarnings("ignore", module=r"pytorch_lightning(\.|$)")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Keep Lightning's tips, device lines and data-loader advice out of a normal run."""
    saved = {name: logging.getLogger(name).level for name in _LIGHTNING_LOGGERS}
    try:
        with warnings.catch_warnings():
            _silence_lightning()
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _strategy(runtime: RuntimeConfig, streamed: bool = False) -> str:
    """Lightning's strategy for ``runtime``: its own choice for one device, DDP in new processes for several.

    Lightning's default for several devices (``"ddp"``) starts the calling script again in each
    process, so every process would run the user's whole script and write the atlas. Cells in
    memory train in processes forked from this one (``"ddp_fork"``: nothing is copied); cells read
    from the store train in spawned processes (``"ddp_spawn"``) that open the store themselves,
    because TileDB reads hang in a process forked from one that has used TileDB.
    """
    if runtime.strategy != "auto":
        return runtime.strategy
    if _device_count(runtime) <= 1:
        return "auto"
    return "ddp_spawn" if streamed else "ddp_fork"


def _trainer_strategy(strategy: str) -> dict:
    """Return the Trainer's ``strategy`` and ``plugins`` for ``strategy``.

    With ``ddp_fork`` / ``ddp_spawn`` the engine starts the processes itself, so ranks and world
    size are Lightning's own (``LightningEnvironment``), not a scheduler's: inside a SLURM
    allocation Lightning would otherwise take SLURM_NTASKS (1 for a script run once) for the
    world size of N devices. ``ddp_spawn`` is Lightning's DDP whose spawned processes end as
    forked ones do (:class:`_SpawnLauncher`).
    """
    if strategy == "ddp_spawn":
        return {"strategy": _SpawnedDDP(start_method="spawn", cluster_environment=LightningEnvironment()),
                "plugins": []}
    return {"strategy": strategy, "plugins": [LightningEnvironment()] if strategy == "ddp_fork" else []}


class _SpawnLauncher(_MultiProcessingLauncher):
    """Lightning's launcher of spawned processes, whose processes end without the interpreter's teardown.

    A forked process ends with ``os._exit`` once its work is done; a spawned one goes through the
    interpreter's full teardown, where C++ threads the training left (gloo's, TileDB's) can abort
    it ("terminate called without an active exception") after its results were sent, and the
    parent then reports the training as failed. Once the process has returned its results, its
    epoch reports are flushed and it ends as a forked process does. A process that fails still
    ends the usual way, with its error.
    """

    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        super()._wrapping_function(*args, **kwargs)
        _end_spawned_process()


class _SpawnedDDP(DDPStrategy):
    """Lightning's DDP in spawned processes, launched by :class:`_SpawnLauncher`."""

    def _configure_launcher(self) -> None:
        self._launcher = _SpawnLauncher(self, start_method=self._start_method)


def _end_spawned_process() -> None:
    """End this spawned training process, whose results are sent: flush what it sent, then ``os._exit(0)``."""
    for relay in _RELAYS_HERE:
        relay.queue.close()
        relay.queue.join_thread()  # the epoch rows still in the queue's feeder thread reach the parent
    _close_process_group()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def _device_count(runtime: RuntimeConfig) -> int:
    """How many devices ``runtime.devices`` means: a count, a list of ids, or -1 / "auto" (every GPU, else one CPU)."""
    devices = runtime.devices
    if isinstance(devices, int) and devices >= 0:
        return devices
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    gpu = runtime.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    return torch.cuda.device_count() if gpu else 1




def batch_per_process(batch_size: int, runtime: RuntimeConfig | None = None) -> int:
    """Return how many cells of every minibatch each training process takes (all of them with one process).

    Several processes share each minibatch, so an optimiser step sees the same cells, and an
    epoch has the same steps, as with one process; each process draws its replayed share of its
    own part, ``round(batch_per_process * replay_fraction)`` cells.

    Example
    -------
    >>> batch_per_process(128), batch_per_process(128, RuntimeConfig(accelerator="cpu", devices=3))
    (128, 43)
    """
    return -(-int(batch_size) // training_processes(runtime))


def training_processes(runtime: RuntimeConfig | None = None) -> int:
    """Return how many processes a training under ``runtime`` runs in (Lightning's count of devices for the strategy)."""
    runtime = runtime or RuntimeConfig()
    return 1 if _strategy(runtime) == "auto" else max(1, _device_count(runtime))


_RELAYS_HERE: list[_EpochRelay] = []
"""The epoch relays unpickled in this (training) process."""


class _EpochRelay:
    """Carries each epoch's losses from the training process of rank 0 to this process.

    A queue of the start method the training processes are made with (it travels with the
    training plan); this process reads it in a thread while Lightning waits for the processes.
    """

    def __init__(self, start_method: str) -> None:
        self.queue = mp.get_context(start_method).Queue()

    def __setstate__(self, state: dict) -> None:
        """Restore the relay in a training process; a spawned one flushes it before it ends."""
        self.__dict__.update(state)
        _RELAYS_HERE.append(self)

    def __call__(self, row: dict[str, float]) -> None:
        """Send one epoch's losses (called in the training process of rank 0; never blocks)."""
        self.queue.put(row)


@contextmanager
def _epoch_reports(progress: Phase, strategy: str,
                   rows: list[dict[str, float]]) -> Iterator[Callable[[dict[str, float]], None]]:
    """Yield the plan's per-epoch callback: it advances ``progress`` here, or from the training processes.

    With several processes each epoch's row also goes into ``rows`` (the run's history, which
    the plan keeps in the processes). The reader stops when the training has ended, after the
    rows already sent, and is never waited for more than a few seconds.
    """
    on_epoch = _advance_per_epoch(progress)
    if strategy not in ("ddp_fork", "ddp_spawn"):
        yield on_epoch
        return
    relay = _EpochRelay(strategy.removeprefix("ddp_"))
    stop = threading.Event()

    def receive(row: dict[str, float]) -> None:
        rows.append(row)
        try:
            on_epoch(row)
        except Exception:  # a display problem must not stop the reader (rank 0 would fill the queue)
            logging.getLogger("atlasengine").debug("progress display failed", exc_info=True)

    def drain() -> None:
        while not stop.is_set():
            try:
                receive(relay.queue.get(timeout=0.2))
            except queue.Empty:
                continue
        while True:  # what rank 0 sent before the processes ended
            try:
                receive(relay.queue.get_nowait())
            except queue.Empty:
                return

    reader = threading.Thread(target=drain, name="epoch-reports", daemon=True)
    reader.start()
    try:
        yield relay
    finally:
        stop.set()
        reader.join(timeout=5)
        relay.queue.close()


class _SpawnedProcess(L.Callback):
    """Keeps Lightning quiet in spawned training processes, as :func:`quiet_lightning` keeps it here.

    A spawned process starts a fresh interpreter and unpickles the trainer, callbacks included:
    this callback silences Lightning's loggers and warnings as it is unpickled in another
    process, before Lightning prints its device and process lines there. (Lightning itself
    gives each process its share of the CPU threads.)
    """

    def __init__(self) -> None:
        self.pid = os.getpid()

    def __setstate__(self, state: dict) -> None:
        """Restore the callback; in another process than the one that made it, silence Lightning."""
        self.__dict__.update(state)
        if os.getpid() != self.pid:
            _silence_lightning()
            atexit.register(_close_process_group)  # a failing process still ends through the teardown
            fault_point("training_process")


def _close_process_group() -> None:
    """Close the process group of a spawned training process before its interpreter is torn down.

    A spawned process ends through the interpreter's full teardown (a forked one skips it);
    gloo's threads left to that teardown can abort the process ("terminate called without an
    active exception") after its training has finished.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    gc.collect()  # what the training left (TileDB handles among it) goes before the teardown too


def _refuse_forked_stream(strategy: str, streamed: bool) -> None:
    if not streamed:
        return
    if strategy == "ddp_fork":
        raise InputError("strategy='ddp_fork' cannot train on a streamed input (backed AnnData or SomaInput): TileDB "
                         "reads hang in forked processes; use strategy='ddp_spawn' (the default for several devices)")
    if strategy == "ddp_spawn" and (hasattr(sys, "ps1") or sys.flags.interactive):  # Lightning's test of a notebook
        raise InputError("a streamed input (backed AnnData or SomaInput) trains on several processes only from a "
                         "script: Lightning spawns no processes in a notebook or interactive session, and TileDB "
                         "reads hang in forked ones; use runtime devices=1 and strategy='auto' here, or run the same "
                         "code as a script")


def _is_main_test(test: ast.expr) -> bool:
    """Whether ``test`` is ``__name__ == "__main__"`` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    return any(isinstance(a, ast.Name) and a.id == "__name__" for a in sides) and \
        any(isinstance(a, ast.Constant) and a.value == "__main__" for a in sides)


def _unguarded_script_line() -> tuple[str, int] | None:
    """Return (script, line) when this call runs in a script's top-level code outside ``if __name__ == "__main__":``.

    A spawned process imports the script it was started from and runs that code again; a
    process that dies there leaves its parent blocked writing the process's data into a pipe
    no one reads, so the parent must know beforehand. None when the code is guarded, or there
    is no script file (``python -c``, a notebook).
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    frame = inspect.currentframe()
    while frame is not None and not (frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__main__"):
        frame = frame.f_back
    if frame is None or not path:
        return None
    line = frame.f_lineno
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return None
    guarded = any(isinstance(node, ast.If) and _is_main_test(node.test) and node.lineno <= line <= (node.end_lineno or 0)
                  for node in ast.walk(tree))
    return None if guarded else (str(path), line)


def check_runtime(runtime: RuntimeConfig, streamed: bool = False) -> None:
    """Refuse, before anything is written, machine settings that cannot train here.

    Lightning checks the accelerator, devices and strategy when its Trainer is built (cheap;
    nothing runs); ``streamed``: the input is read from the cell store (no forked processes). A
    process that is one of several started by ``torchrun`` is refused: the engine starts its own
    training processes, and every copy of the script would write the atlas.

    Raises
    ------
    InputError
        Naming the setting.
    """
    if getattr(mp.current_process(), "_inheriting", False):  # what multiprocessing and Lightning test
        raise InputError("this process was spawned (a streamed input on several devices trains in spawned "
                         "processes) and is running the calling script's work again as it imports the script: put "
                         "that work under `if __name__ == \"__main__\":`")
    world = os.environ.get("WORLD_SIZE", "1").strip()
    if world.isdigit() and int(world) > 1 and torch.distributed.is_available() \
            and torch.distributed.is_torchelastic_launched():
        raise InputError(f"this process is one of {world} started by torchrun, and each would write the atlas: "
                         "run the script once (python script.py) with runtime devices=N, and atlasengine starts the "
                         "N training processes itself")
    strategy = _strategy(runtime, streamed)
    _refuse_forked_stream(strategy, streamed)
    if strategy == "ddp_fork" and torch.cuda.is_initialized():  # Lightning refuses this at launch
        raise InputError("CUDA is already in use in this process, and a process forked from it cannot use CUDA: "
                         "pass runtime strategy='ddp_spawn' (processes started afresh; a script needs the "
                         "`if __name__ == \"__main__\":` guard), or train before anything here touches the GPU")
    if strategy == "ddp_spawn" and (where := _unguarded_script_line()):
        raise InputError(f"{where[0]}, line {where[1]}: the training processes are spawned (a streamed input on several "
                         "devices), and each imports this script and would run this line again: put the script's "
                         "work under `if __name__ == \"__main__\":`")
    with quiet_lightning():
        try:
            L.Trainer(accelerator=runtime.accelerator, devices=runtime.devices, **_trainer_strategy(strategy),
                      logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
        except Exception as exc:  # Lightning raises ValueError, MisconfigurationException, TypeError
            raise InputError(f"runtime accelerator={runtime.accelerator!r}, devices={runtime.devices!r}, "
                             f"strategy={runtime.strategy!r} cannot run here: {exc}") from exc
    on_cpu = runtime.accelerator == "cpu" or not torch.cuda.is_available()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if on_cpu and training_processes(runtime) > cores:  # any count runs on CPU (processes), but shares the cores
        logging.getLogger("atlasengine").warning(
            "devices=%s starts %d training processes on %d CPU core(s): they share the cores, so training is slower "
            "than with %d", runtime.devices, training_processes(runtime), cores, cores)


def fit(
    module: nn.Module,
    query: CellSource,
    config: TrainingConfig,
    replay: CellData | None = None,
    replay_fraction: float = 0.0,
    penalty: Penalty | None = None,
    runtime: RuntimeConfig | None = None,
    name: str = "training",
    gradient_filter: GradientFilter | None = None,
) -> TrainResult:
    """Train ``module`` in place on ``query`` (mixed with ``replay`` cells) and return the run's record.

    Parameters
    ----------
    module
        The torch model; trained in place, returned to the CPU in eval mode.
    query
        The cells to fit (``config.validation_fraction`` of them held out for early stopping): in memory, or
        read from the cell store in shuffled blocks of ``runtime.block_cells``.
    config
        Epochs, batch size, learning rate, KL warm-up, early stopping, seed.
    replay, replay_fraction
        Reference cells mixed into every minibatch, and their share of it.
    penalty
        ``penalty(module, x, batch) -> scalar`` added to each minibatch's loss (the EWC penalty,
        the embedding anchor).
    runtime
        Accelerator, devices and progress display (never stored).
    name
        The phase's name in the progress bar or log line.
    gradient_filter
        ``gradient_filter(module)`` changes the gradients before each optimiser step (surgery).

    Returns
    -------
    TrainResult
        Epochs run, wall time, throughput, device and per-epoch losses.

    Raises
    ------
    TrainingError
        When the loss stops being finite, or Lightning fails.
    """
    runtime = runtime or RuntimeConfig()
    L.seed_everything(config.seed, workers=False, verbose=False)
    # several processes share each minibatch: the same cells per optimiser step and steps per epoch as one process
    per_process = batch_per_process(config.batch_size, runtime)
    streamed = not isinstance(query, CellData)
    strategy = _strategy(runtime, streamed)
    _refuse_forked_stream(strategy, streamed)
    train, val = make_loaders(query, replay, per_process, replay_fraction, config.validation_fraction, config.seed,
                              block=runtime.block_cells)
    module.train()  # dropout on; Lightning keeps whatever mode the module is in
    max_epochs = config.max_epochs or default_epochs(len(query), config.epochs_cap)
    start = time.perf_counter()
    relayed: list[dict[str, float]] = []  # the epochs' losses, when the training runs in other processes
    with quiet_lightning(), phase(name, total=max_epochs, unit="epochs", progress=runtime.progress) as progress:
        callbacks: list[L.Callback] = []
        if strategy == "ddp_spawn":
            callbacks.append(_SpawnedProcess())
        if config.early_stopping and val is not None:
            callbacks.append(EarlyStopping(monitor="val_loss", patience=config.early_stopping_patience, mode="min"))
        trainer: L.Trainer | None = None
        sigint = signal.getsignal(signal.SIGINT)
        try:
            trainer = L.Trainer(
                max_epochs=max_epochs,
                accelerator=runtime.accelerator,
                devices=runtime.devices,
                **_trainer_strategy(strategy),
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=False,
                callbacks=callbacks,
                num_sanity_val_steps=0,
                limit_val_batches=1.0 if val is not None else 0,
                log_every_n_steps=max(1, len(train)),
                gradient_clip_val=None,
            )
            with _epoch_reports(progress, strategy, relayed) as on_epoch, _one_thread_per_process(trainer, strategy):
                plan = TrainingPlan(module, config, penalty, on_epoch=on_epoch, gradient_filter=gradient_filter)
                trainer.fit(plan, train_dataloaders=train, val_dataloaders=val)
        except TrainingError:
            raise
        except SystemExit:
            if trainer is not None and trainer.interrupted:  # Lightning turns Ctrl-C into exit(1) and ignores SIGINT
                _restore_sigint(sigint)
                raise KeyboardInterrupt from None
            raise
        except Exception as exc:
            raise TrainingError(f"training failed: {exc}") from exc
        history = plan.history or relayed or _history_from_workers(trainer)
        epochs = int(history[-1]["epoch"]) + 1 if history else 0
        if epochs < max_epochs:
            progress.note = f"stopped early: validation loss flat for {config.early_stopping_patience} epochs"
    seconds = time.perf_counter() - start
    device = str(next(module.parameters()).device)
    if trainer.world_size > 1:  # the training ran in the forked processes
        device = f"{trainer.strategy.root_device.type} x {trainer.world_size}"
    module.cpu().eval()
    cells = epochs * train.sampler.cells_per_epoch()
    return TrainResult(epochs, seconds, cells / max(seconds, 1e-9), device, history)


def _restore_sigint(handler: Any) -> None:
    """Put back the Ctrl-C handler Lightning replaced (only the main thread may, and only a Python-set one)."""
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)


@contextmanager
def _one_thread_per_process(trainer: L.Trainer, strategy: str) -> Iterator[None]:
    """One torch (OpenMP) thread in each forked training process on CPU (``ddp_fork``), restored here afterwards.

    GNU OpenMP is not safe across fork: a forked process that opens a parallel region of the
    threads this one started hangs. With one thread each, the processes use the cores instead.
    """
    if strategy != "ddp_fork" or trainer.world_size <= 1 or trainer.strategy.root_device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _history_from_workers(trainer: L.Trainer) -> list[dict[str, float]]:
    """Return the last epoch's losses as the training processes reported them (DDP: the plan ran in other processes).

    Lightning brings the logged metrics back to this process; the per-epoch history stays in
    the workers, so only the last epoch is known here.
    """
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if "epochs_run" not in metrics:
        return []
    row = {"epoch": metrics.pop("epochs_run") - 1}
    row.update({k: v for k, v in metrics.items() if k in ("train_loss", "val_loss", "penalty")})
    return [row]


@torch.no_grad()
def embed(module: nn.Module, parts: Iterable[CellData], batch_size: int = 4096) -> np.ndarray:
    """Posterior means of cells given in parts (dropout off), as one float32 array.

    Example
    -------
    >>> import scipy.sparse as sp
    >>> from atlasengine.model import CVAE
    >>> m = CVAE(n_genes=5, n_batches=1)
    >>> embed(m, [CellData(sp.csr_matrix(np.ones((3, 5))), np.zeros(3))]).shape
    (3, 10)
    """
    out = []
    for data in parts:
        for s in range(0, len(data), batch_size):
            x = torch.from_numpy(data.counts[s : s + batch_size].toarray())
            b = torch.from_numpy(data.batch[s : s + batch_size])
            out.append(module.latent(x, b).numpy())
    if not out:
        return np.zeros((0, module.config.n_latent), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def embed_cells(
    module: nn.Module, cells: CellSource, chunk_size: int = 20_000, progress: bool | None = None
) -> np.ndarray:
    """Embeddings of every cell of ``cells``, read ``chunk_size`` at a time, as one progress phase."""
    with phase("embedding", total=len(cells), unit="cells", progress=progress) as p:
        parts = []
        for part in iter_chunks(cells, chunk_size):
            parts.append(embed(module, [part]))
            p.advance(len(part))
    return np.concatenate(parts) if parts else np.zeros((0, module.config.n_latent), dtype=np.float32)
