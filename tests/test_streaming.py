"""Streamed input (backed AnnData, TileDB-SOMA experiment) and training in shuffled blocks read from the store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tiledbsoma.io
import torch

from atlasengine import Atlas, InputError, SomaInput
from atlasengine.api.sources import as_input
from atlasengine.training.data import CellData, MixedBatchSampler, RowBatches
from tests.conftest import TINY, snapshot


@pytest.fixture(scope="module")
def files(tmp_path_factory, pancreas_ref, pancreas_query):
    """The reference and query as .h5ad files, and the whole set as a SOMA experiment."""
    d = tmp_path_factory.mktemp("streamed")
    ref, query = d / "ref.h5ad", d / "query.h5ad"
    pancreas_ref.write_h5ad(ref)
    query_csr = pancreas_query.copy()
    query_csr.X = sp.csr_matrix(query_csr.X)
    query_csr.write_h5ad(query)
    soma = str(d / "pancreas.soma")
    full = pancreas_query.copy()
    full.obs["tech"] = full.obs["tech"].astype(str)
    tiledbsoma.io.from_anndata(soma, full, measurement_name="RNA")
    return {"ref": ref, "query": query, "soma": soma}


def _read_backed(path):
    import anndata as ad

    return ad.read_h5ad(path, backed="r")


def test_backed_create_equals_in_memory_create(tmp_path, files, pancreas_ref):
    """A backed AnnData streams through the store and trains to the same model as the same cells in memory."""
    a = Atlas.create(tmp_path / "memory.atlas", pancreas_ref, batch_key="tech", label_key="celltype", config=TINY)
    backed = _read_backed(files["ref"])
    assert as_input(backed).streamed
    b = Atlas.create(tmp_path / "backed.atlas", backed, batch_key="tech", label_key="celltype", config=TINY)
    np.testing.assert_allclose(b.latent(), a.latent(), atol=1e-5)
    assert (b.counts() != a.counts()).nnz == 0
    pd.testing.assert_frame_equal(b.obs(), a.obs())


def test_streamed_training_in_blocks_reads_every_cell_once_per_epoch():
    """Block-wise shuffling: each epoch visits every query cell once; blocks mix chunks from all over the data."""
    sampler = MixedBatchSampler(1000, 0, 64, 0.0, seed=0, block=256 * 1024, chunk=32)
    sampler.block = 256  # (the chunk kept at 32: normally at most 1/1024 of a block)
    for _ in range(2):
        draws = list(sampler)
        order = np.concatenate([d.positions for d in draws])
        assert sorted(order.tolist()) == list(range(1000))
        for d in draws:  # every position lies in a block the draw names; at most two blocks per minibatch
            assert 1 <= len(d.blocks) <= 2
            assert np.isin(d.positions, np.concatenate([b for _, b in d.blocks])).all()
        first = draws[0].blocks[0][1]
        assert len(first) == 256 and first.max() - first.min() > 500  # chunks from far apart, not one run
        assert len(np.unique(first // 32)) == 8  # eight whole chunks of 32
    small = MixedBatchSampler(200, 0, 64, 0.0, seed=0, block=300)
    plain = MixedBatchSampler(200, 0, 64, 0.0, seed=0, block=None)
    for x, y in zip(small, plain, strict=True):  # below one block: the plain shuffle, draw for draw
        np.testing.assert_array_equal(x, y)


class _Counted:
    """A cell source that is not in memory and counts its reads."""

    def __init__(self, data: CellData) -> None:
        self.data, self.reads, self.n_genes = data, [], data.n_genes

    def __len__(self) -> int:
        return len(self.data)

    def read(self, positions):
        self.reads.append(len(positions))
        return self.data.read(positions)


def test_row_batches_read_each_block_once_and_return_the_right_rows():
    rng = np.random.default_rng(0)
    counts = sp.random(500, 20, density=0.3, format="csr", random_state=1, dtype=np.float32)
    data = CellData(counts, rng.integers(0, 3, 500))
    replay = CellData(counts[:50], np.zeros(50, dtype=np.int64))
    source = _Counted(data)
    rows = np.sort(rng.choice(500, 400, replace=False))
    batches = RowBatches([(source, rows), (replay, np.arange(50))], block=128)
    sampler = MixedBatchSampler(len(rows), 50, 32, 0.25, seed=1, block=128)
    for draw in sampler:
        x, b = batches[draw]
        q = draw.positions[draw.positions < len(rows)]
        np.testing.assert_array_equal(x.numpy()[: len(q)], counts[rows[q]].toarray())
        np.testing.assert_array_equal(b.numpy()[: len(q)], data.batch[rows[q]])
        np.testing.assert_array_equal(x.numpy()[len(q):], counts[draw.positions[len(q):] - len(rows)].toarray())
    assert len(source.reads) == 4 and max(source.reads) <= 128  # 400 cells in blocks of 128: each read once


def test_streamed_ingest_with_small_blocks(tmp_path, reference_atlas, files, pancreas_query):
    """A backed query trains from the store in blocks smaller than itself and maps like the in-memory one."""
    import shutil

    a_path, b_path = tmp_path / "a.atlas", tmp_path / "b.atlas"
    shutil.copytree(reference_atlas, a_path)
    shutil.copytree(reference_atlas, b_path)
    mem = Atlas.open(a_path).ingest(pancreas_query, batch_key="tech", label_key="celltype", strategy="ewc")
    res = Atlas.open(b_path).ingest(_read_backed(files["query"]), batch_key="tech", label_key="celltype",
                                    strategy="ewc", runtime={"block_cells": 64})
    assert res.version.n_new_cells == pancreas_query.n_obs
    known = res.predictions["label"].notna()
    agree = (res.predictions["predicted_label"] == mem.predictions["predicted_label"]).mean()
    assert agree > 0.8, agree  # different minibatches, the same mapping
    out = res.to_anndata()
    assert out.X is None and "X_atlasengine" in out.obsm and known.any()


def test_soma_input_with_obs_filter(tmp_path, reference_atlas, files, pancreas_query):
    """A SOMA experiment (with an obs filter) folds in the cells the filter selects, named by obs_id."""
    import shutil

    path = tmp_path / "a.atlas"
    shutil.copytree(reference_atlas, path)
    res = Atlas.open(path).ingest(SomaInput(files["soma"], obs_filter="tech == 'celseq2'", layer="data", chunk_cells=37),
                                  batch_key="tech", strategy="surgery")
    want = pancreas_query.obs_names[pancreas_query.obs["tech"] == "celseq2"]
    assert sorted(res.predictions.index) == sorted(want)
    atlas = Atlas.open(path)
    stored = atlas.to_anndata(counts=True, cells=list(want))
    np.testing.assert_array_equal(stored.X.toarray(), pancreas_query[want].X.toarray())


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (lambda f: SomaInput(f["soma"] + "_missing"), "cannot open"),
        (lambda f: SomaInput(f["soma"]), "name the one with raw counts"),
        (lambda f: SomaInput(f["soma"], layer="raw"), "no X layer 'raw'"),
        (lambda f: SomaInput(f["soma"], measurement="ATAC"), "no measurement 'ATAC'"),
        (lambda f: SomaInput(f["soma"], obs_filter="tech == 'nothing'", layer="data"), "no cells"),
        (lambda f: SomaInput(f["soma"], obs_filter="no_such_column == 1", layer="data"),
         r"obs filter .*: .*no_such_column[^\n]*\Z"),  # TileDB's one line, without its call stack
    ],
)
def test_soma_input_errors_leave_the_atlas_as_it_was(atlas_path, files, source, message):
    before = snapshot(atlas_path)
    with pytest.raises(InputError, match=message):
        Atlas.open(atlas_path).ingest(source(files), batch_key="tech")
    assert snapshot(atlas_path) == before


def test_an_anndata_layer_argument_with_a_soma_input_says_where_the_layer_goes(atlas_path, files):
    with pytest.raises(InputError, match=r"SomaInput\(layer=...\)"):
        Atlas.open(atlas_path).ingest(SomaInput(files["soma"], layer="data"), batch_key="tech", layer="data")


def test_backed_input_with_non_counts_is_refused_before_anything_is_written(tmp_path, atlas_path, pancreas_query):
    bad = pancreas_query.copy()
    bad.X = sp.csr_matrix(bad.X, dtype=np.float32)
    bad.X.data[-1] = 0.5  # in the last part only
    f = tmp_path / "bad.h5ad"
    bad.write_h5ad(f)
    before = snapshot(atlas_path)
    import atlasengine.api.sources as sources

    backed = _read_backed(f)
    with pytest.raises(InputError, match="non-integer"):
        Atlas.open(atlas_path).ingest(sources.as_input(backed, chunk_cells=50), batch_key="tech")
    assert snapshot(atlas_path) == before


def test_streamed_training_refuses_forked_processes(tmp_path, files, atlas_path):
    """TileDB reads hang in a forked process: ddp_fork with a streamed input is refused before anything is written."""
    forked = {"devices": 2, "accelerator": "cpu", "strategy": "ddp_fork"}
    with pytest.raises(InputError, match="ddp_spawn"):
        Atlas.create(tmp_path / "x.atlas", _read_backed(files["ref"]), batch_key="tech", label_key="celltype",
                     config=TINY, runtime=forked)
    assert not (tmp_path / "x.atlas").exists()
    before = snapshot(atlas_path)
    with pytest.raises(InputError, match="ddp_spawn"):
        Atlas.open(atlas_path).ingest(_read_backed(files["query"]), batch_key="tech", runtime=forked)
    assert snapshot(atlas_path) == before


def test_streamed_training_on_several_processes_from_a_notebook_is_refused_with_why(atlas_path, files, monkeypatch):
    """Lightning spawns no processes in an interactive session (it tests sys.ps1): say so, before anything is written."""
    import sys

    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)
    before = snapshot(atlas_path)
    with pytest.raises(InputError, match="only from a script"):
        Atlas.open(atlas_path).ingest(_read_backed(files["query"]), batch_key="tech",
                                      runtime={"devices": 2, "accelerator": "cpu"})
    assert snapshot(atlas_path) == before


SPAWNED = """
import sys, anndata as ad, numpy as np
from atlasengine import Atlas
from atlasengine.transfer import evaluate_transfer
print("script ran", flush=True)  # once: the training processes are spawned for the training only
ref_file, query_file, out = sys.argv[1:4]
query = ad.read_h5ad(query_file)
cfg = {"reference_training": {"max_epochs": 40}, "query_training": {"max_epochs": 20}}
def run(name, ref, q, **runtime):
    runtime = {"devices": 2, "accelerator": "cpu", "progress": False, **runtime}
    atlas = Atlas.create(f"{out}/{name}.atlas", ref, batch_key="tech", label_key="celltype", config=cfg, runtime=runtime)
    res = atlas.ingest(q, batch_key="tech", strategy="ewc", runtime=runtime)
    ev = evaluate_transfer(res.predictions, query.obs["celltype"], {"ductal"})
    np.save(f"{out}/{name}.npy", atlas.latent())
    print(f"RESULT|{name}|{ev['known_accuracy']}|{res.training['device']}|{len(atlas.versions)}", flush=True)
run("memory", ad.read_h5ad(ref_file), query)  # forked processes
run("streamed", ad.read_h5ad(ref_file, backed="r"), ad.read_h5ad(query_file, backed="r"))  # spawned, one block
run("blocks", ad.read_h5ad(ref_file, backed="r"), ad.read_h5ad(query_file, backed="r"), block_cells=64)
"""


def test_streamed_input_trains_in_two_spawned_processes(tmp_path, files):
    """Streamed cells train under DDP in spawned processes that read the store themselves.

    Below one block the streamed minibatches are the in-memory ones, so two spawned processes
    reading the store train to the model two forked processes train from memory; in blocks of 64
    cells (shared out between the processes) the fold-in still learns the types. The script runs
    once and Lightning prints nothing in the spawned processes.
    """
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", SPAWNED, str(files["ref"]), str(files["query"]), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("script ran") == 1, proc.stdout
    rows = {r[1]: r[2:] for r in (line.split("|") for line in proc.stdout.splitlines() if line.startswith("RESULT"))}
    assert set(rows) == {"memory", "streamed", "blocks"}, proc.stdout
    assert all(device == "cpu x 2" and versions == "2" for _, device, versions in rows.values()), rows
    np.testing.assert_allclose(np.load(tmp_path / "streamed.npy"), np.load(tmp_path / "memory.npy"), atol=1e-4)
    assert float(rows["blocks"][0]) >= 0.8, rows
    for chatter in ("Initializing distributed", "distributed_backend", "Trainer.fit", "Warning"):
        assert chatter not in proc.stderr, proc.stderr[-3000:]


UNGUARDED = """
import sys, anndata as ad
from atlasengine import Atlas
print("script ran", flush=True)
Atlas.open(sys.argv[1]).ingest(ad.read_h5ad(sys.argv[2], backed="r"), batch_key="tech", training={"max_epochs": 1},
                               runtime={"devices": 2, "accelerator": "cpu", "progress": False})
"""


def test_a_script_without_the_main_guard_is_refused_before_anything_is_written(tmp_path, files, atlas_path):
    """Spawned processes import the calling script and would run its work again: refused, naming the line.

    (A spawned process that fails there leaves its parent blocked writing the training's data into
    the pipe: the parent must see it first.) The same work under the guard trains.
    """
    import subprocess
    import sys

    before = snapshot(atlas_path)
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    proc = subprocess.run([sys.executable, str(script), str(atlas_path), str(files["query"])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stdout.count("script ran") == 1
    assert f'{script}, line 5:' in proc.stderr and 'if __name__ == "__main__":' in proc.stderr, proc.stderr[-3000:]
    assert snapshot(atlas_path) == before
    guarded = UNGUARDED.replace("\nAtlas.open", '\nif __name__ == "__main__":\n    Atlas.open').replace(
        "\n                               runtime", "\n                                   runtime")
    script.write_text(guarded)
    proc = subprocess.run([sys.executable, str(script), str(atlas_path), str(files["query"])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("script ran") == 3  # the spawned processes import the script, and stop at the guard
    assert len(Atlas.open(atlas_path).versions) == 2


SPAWNED_INGEST = """
import sys, anndata as ad
from atlasengine import Atlas
res = Atlas.open(sys.argv[1]).ingest(ad.read_h5ad(sys.argv[2], backed="r"), batch_key="tech", training={"max_epochs": 2},
                                     runtime={"devices": 2, "accelerator": "cpu", "progress": False})
print("RESULT", res.version.number, res.training["device"], res.training["epochs"], flush=True)
"""


def test_a_spawned_training_process_killed_mid_training_leaves_the_atlas_as_it_was(tmp_path, files, atlas_path):
    """A training process that dies (SIGKILL at its first epoch's end) fails the ingest; the same command then runs."""
    import os
    import subprocess
    import sys

    def run(fault: str | None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "ATLASENGINE_FAULT"}
        if fault:
            env["ATLASENGINE_FAULT"] = fault
        return subprocess.run([sys.executable, "-c", SPAWNED_INGEST, str(atlas_path), str(files["query"])],
                              capture_output=True, text=True, timeout=300, env=env)

    crashed = run("training_epoch:kill")
    assert crashed.returncode != 0 and "RESULT" not in crashed.stdout
    assert "training failed" in crashed.stderr, crashed.stderr[-3000:]
    atlas = Atlas.open(atlas_path)
    assert len(atlas.versions) == 1 and len(atlas.obs()) == 300
    again = run(None)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "RESULT 2 cpu x 2 2" in again.stdout


def test_a_training_process_that_aborts_in_its_interpreter_teardown_does_not_fail_the_ingest(tmp_path, files,
                                                                                              atlas_path):
    """A spawned process ends once its results are sent, without the teardown where leftover threads can abort it.

    The fault makes each spawned process abort (SIGABRT) if its interpreter is torn down; the
    ingest still commits, with every epoch's report, as with forked processes.
    """
    import os
    import subprocess
    import sys

    env = {**os.environ, "ATLASENGINE_FAULT": "training_process:abort_at_exit"}
    proc = subprocess.run([sys.executable, "-c", SPAWNED_INGEST, str(atlas_path), str(files["query"])],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT 2 cpu x 2 2" in proc.stdout, proc.stdout  # version 2, two processes, both epochs relayed
    assert len(Atlas.open(atlas_path).versions) == 2


def test_command_line_streams_backed_files_and_soma_experiments(tmp_path, files, reference_atlas, capsys):
    import shutil

    from atlasengine.cli.main import main

    path = tmp_path / "cli.atlas"
    assert main(["create", str(path), "-i", str(files["ref"]), "--backed", "--batch-key", "tech",
                 "--label-key", "celltype", "--epochs", "2"]) == 0
    assert "created" in capsys.readouterr().out
    copy = tmp_path / "copy.atlas"
    shutil.copytree(reference_atlas, copy)
    assert main(["ingest", str(copy), "-i", files["soma"], "--soma", "--layer", "data", "--obs-filter",
                 "tech == 'smartseq2'", "--batch-key", "tech", "--strategy", "surgery", "--epochs", "1"]) == 0
    assert "version 2 (surgery)" in capsys.readouterr().out
    assert main(["ingest", str(copy), "-i", str(files["query"]), "--obs-filter", "tech == 'x'",
                 "--batch-key", "tech"]) == 2
    assert "--soma" in capsys.readouterr().err
    assert main(["ingest", str(copy), "-i", files["soma"], "--soma", "--layer", "data", "--obs-filter",
                 "tech == 'celseq2'", "--batch-key", "tech", "--accelerator", "cpu", "--devices", "2",
                 "--strategy", "surgery", "--epochs", "1"]) == 0
    assert "version 3 (surgery)" in capsys.readouterr().out  # in two spawned processes
    before, after = Atlas.open(copy, version=2).model().state_dict(), Atlas.open(copy).model().state_dict()
    for name, old in before.items():  # surgery's filter reached the spawned processes: old weights unchanged
        assert torch.equal(after[name][: old.shape[0]], old), name
    assert main(["ingest", str(copy), "-i", str(files["query"]), "--batch-key", "tech", "--accelerator", "bogus"]) == 2
    assert "accelerator='bogus'" in capsys.readouterr().err


def test_transfer_labels_from_a_soma_experiment_equals_the_anndata(two_version_atlas, files, pancreas_query):
    atlas = Atlas.open(two_version_atlas)
    want = atlas.transfer_labels(pancreas_query, batch_key="tech")
    got = atlas.transfer_labels(SomaInput(files["soma"], layer="data", chunk_cells=50), batch_key="tech")
    pd.testing.assert_frame_equal(got.loc[want.index], want)


def test_soma_names_default_to_joinids_and_a_named_gene_column(tmp_path, pancreas_query):
    """Without an obs_id column cells are named by their joinid; genes by the column asked for."""
    adata = pancreas_query[:40].copy()
    adata.var["symbol"] = [f"g_{g}" for g in adata.var_names]
    uri = str(tmp_path / "x.soma")
    tiledbsoma.io.from_anndata(uri, adata, measurement_name="RNA", obs_id_name="barcode", var_id_name="var_id")
    source = as_input(SomaInput(uri, layer="data", var_name_column="symbol"))
    assert list(source.obs_names) == [str(i) for i in range(40)]
    assert list(source.var_names[:2]) == [f"g_{g}" for g in adata.var_names[:2]]
    assert "barcode" in source.obs.columns  # kept as the user's own column
    with pytest.raises(InputError, match="no column 'nope'"):
        as_input(SomaInput(uri, layer="data", var_name_column="nope"))


def test_backed_dense_x_and_a_counts_layer(tmp_path, pancreas_ref):
    """A backed file with a dense X, or with the counts in a layer, streams like a sparse X."""
    import anndata as ad

    dense = pancreas_ref.copy()
    dense.X = np.asarray(sp.csr_matrix(dense.X).todense(), dtype=np.float32)
    dense.layers["raw"] = sp.csr_matrix(dense.X)
    dense.X = np.log1p(dense.X)  # not counts: only the layer is
    f = tmp_path / "dense.h5ad"
    dense.write_h5ad(f)
    with pytest.raises(InputError, match="non-integer"):
        Atlas.create(tmp_path / "x.atlas", ad.read_h5ad(f, backed="r"), batch_key="tech", label_key="celltype",
                     config=TINY)
    atlas = Atlas.create(tmp_path / "y.atlas", ad.read_h5ad(f, backed="r"), batch_key="tech", label_key="celltype",
                         layer="raw", config=TINY)
    assert (atlas.counts() != sp.csr_matrix(pancreas_ref.X)).nnz == 0
