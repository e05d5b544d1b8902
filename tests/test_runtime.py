"""Machine settings: several training processes match one; a device that cannot run is refused before anything is written."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import DATA, TINY, snapshot

from atlasengine import Atlas, InputError

TWO_PROCESSES = """
import sys, anndata as ad, numpy as np
from atlasengine import Atlas
from atlasengine.transfer import evaluate_transfer
print("script ran", flush=True)  # once: the other training process is forked for the training only
a = ad.read_h5ad(sys.argv[2])
tech = a.obs["tech"].astype(str)
ref = a[(tech.isin(["celseq", "fluidigmc1", "indrop"]) & (a.obs["celltype"] != "ductal")).to_numpy()].copy()
q = a[tech.isin(["celseq2", "smartseq2"]).to_numpy()].copy()
for seed in (0, 1, 2):
    cfg = {"reference_training": {"max_epochs": 100, "seed": seed}, "query_training": {"max_epochs": 60, "seed": seed}}
    for devices in (1, 2):
        runtime = {"devices": devices, "accelerator": "cpu", "progress": False}
        atlas = Atlas.create(f"{sys.argv[1]}/s{seed}_d{devices}.atlas", ref, batch_key="tech", label_key="celltype",
                             config=cfg, runtime=runtime)
        res = atlas.ingest(q, batch_key="tech", strategy="ewc", runtime=runtime)
        ev = evaluate_transfer(res.predictions, q.obs["celltype"], {"ductal"})
        print("RESULT", seed, devices, ev["known_accuracy"], res.training["epochs"], len(atlas.versions), flush=True)
"""


def test_two_training_processes_on_cpu_match_one_and_only_this_process_writes(tmp_path):
    """DDP in two processes (gloo) folds pancreas in as well as one process does: known-type accuracy within 2 points.

    In another process, as a user's script: the script must run once (Lightning's default DDP
    launcher would start it again for the second rank, which would write the atlas twice).
    """
    proc = subprocess.run([sys.executable, "-c", TWO_PROCESSES, str(tmp_path), str(DATA / "pancreas_panc8_small.h5ad")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("script ran") == 1, proc.stdout
    rows = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert len(rows) == 6, proc.stdout
    accuracy = {(int(s), int(d)): float(a) for s, d, a, epochs, versions in rows}
    assert all(int(epochs) >= 1 and int(versions) == 2 for *_, epochs, versions in rows)
    one = np.mean([accuracy[(s, 1)] for s in range(3)])
    two = np.mean([accuracy[(s, 2)] for s in range(3)])
    assert abs(two - one) <= 0.02, accuracy
    assert one >= 0.8, accuracy  # both actually learned the reference's types


@pytest.mark.parametrize("runtime", [{"accelerator": "bogus"}, {"accelerator": "mps"}])  # mps: Apple only
def test_a_device_setting_that_cannot_run_is_refused_before_anything_is_written(atlas_path, pancreas_query, tmp_path,
                                                                                 runtime):
    before = snapshot(atlas_path)
    with pytest.raises(InputError, match="runtime accelerator=.* cannot run here"):
        Atlas.open(atlas_path).ingest(pancreas_query, batch_key="tech", strategy="surgery", runtime=runtime)
    assert snapshot(atlas_path) == before
    with pytest.raises(InputError, match="runtime accelerator=.* cannot run here"):
        Atlas.create(tmp_path / "new.atlas", pancreas_query, batch_key="tech", label_key="celltype", config=TINY,
                     runtime=runtime)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pancreas.atlas"]


def test_a_script_started_several_times_by_torchrun_is_refused_before_anything_is_written(atlas_path, pancreas_query,
                                                                                          monkeypatch):
    """Under torchrun every copy of the script would fold the query in; the engine starts its own processes."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")  # what torch.distributed.is_torchelastic_launched reads
    monkeypatch.setenv("WORLD_SIZE", "2")
    before = snapshot(atlas_path)
    with pytest.raises(InputError, match="one of 2 started by torchrun"):
        Atlas.open(atlas_path).ingest(pancreas_query, batch_key="tech", strategy="surgery")
    assert snapshot(atlas_path) == before


IN_SLURM = """
import numpy as np, scipy.sparse as sp
from atlasengine.config import RuntimeConfig, TrainingConfig
from atlasengine.model import CVAE
from atlasengine.training import CellData, fit
rng = np.random.default_rng(0)
cells = CellData(sp.csr_matrix(rng.poisson(1.0, (200, 30)).astype(np.float32)), rng.integers(0, 2, 200))
res = fit(CVAE(n_genes=30, n_batches=2), cells, TrainingConfig(max_epochs=2),
          runtime=RuntimeConfig(devices=2, accelerator="cpu", progress=False))
print("RESULT", res.device, res.epochs, len(res.history), flush=True)
"""


def test_two_processes_inside_a_slurm_allocation_are_the_engines_own(tmp_path):
    """A script run once in a SLURM job (SLURM_NTASKS=1) trains on 2 processes: ranks are not taken from SLURM."""
    import os

    env = {**os.environ, "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "atlas", "SLURM_NODELIST": "node1", "SLURM_JOB_ID": "7",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    proc = subprocess.run([sys.executable, "-c", IN_SLURM], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT cpu x 2 2 2" in proc.stdout, proc.stdout


def test_forked_processes_after_cuda_was_used_here_are_refused_with_the_way_out(atlas_path, pancreas_query,
                                                                                monkeypatch):
    """A forked process cannot use CUDA its parent initialised (Lightning fails at launch): refused up front."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    before = snapshot(atlas_path)
    with pytest.raises(InputError, match="strategy='ddp_spawn'"):
        Atlas.open(atlas_path).ingest(pancreas_query, batch_key="tech", strategy="surgery",
                                      runtime={"devices": 2, "accelerator": "cpu"})
    assert snapshot(atlas_path) == before


def test_more_cpu_training_processes_than_cores_run_with_a_warning(caplog):
    import logging
    import os

    from atlasengine.config import RuntimeConfig
    from atlasengine.training import check_runtime

    cores = len(os.sched_getaffinity(0))
    with caplog.at_level(logging.WARNING, logger="atlasengine"):
        check_runtime(RuntimeConfig(accelerator="cpu", devices=cores))
        assert caplog.text == ""
        check_runtime(RuntimeConfig(accelerator="cpu", devices=cores + 2))
    assert f"starts {cores + 2} training processes on {cores} CPU core(s)" in caplog.text
