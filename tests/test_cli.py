"""The command line: listing versions, writing a report, clear errors; the demo on the packaged data."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np

from atlasengine import Atlas
from atlasengine.cli.main import main


def test_versions_report_and_errors(two_version_atlas, tmp_path, capsys):
    assert main(["versions", str(two_version_atlas)]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "surgery" in out and out.count("\n") == 3
    report = tmp_path / "audit.html"
    assert main(["report", str(two_version_atlas), "-o", str(report), "--version", "1"]) == 0
    assert report.exists() and report.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert f"wrote {report.resolve()}" in out and report.resolve().as_uri() in out
    assert re.search(r"status (green|amber|red): reference drift (green|amber|red) \(", out), out
    assert main(["versions", str(tmp_path)]) == 2
    assert "is not an atlas" in capsys.readouterr().err
    assert main(["ingest", str(two_version_atlas), "-i", str(tmp_path / "missing.h5ad"), "--batch-key", "tech"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_transfer_command_writes_predictions(two_version_atlas, tmp_path, pancreas_query):
    q = tmp_path / "q.h5ad"
    pancreas_query.write_h5ad(q)
    out = tmp_path / "pred.csv"
    assert main(["transfer", str(two_version_atlas), "-i", str(q), "--batch-key", "tech", "-o", str(out)]) == 0
    import pandas as pd

    pred = pd.read_csv(out, index_col=0)
    assert len(pred) == pancreas_query.n_obs and {"label", "uncertainty", "is_unknown"} <= set(pred.columns)
    assert (pred["is_unknown"] == pred["is_novel"]).all()  # the default rule: the calibrated novelty
    assert (pred.loc[pred["is_unknown"], "label"] == "Unknown").all()
    # the paper's rule and another target from the command line
    assert main(["transfer", str(two_version_atlas), "-i", str(q), "--batch-key", "tech", "-o", str(out),
                 "--unknown-rule", "uncertainty"]) == 0
    paper = pd.read_csv(out, index_col=0)
    assert (paper["is_unknown"] == (paper["uncertainty"] > 0.3)).all()
    assert main(["transfer", str(two_version_atlas), "-i", str(q), "--batch-key", "tech", "-o", str(out),
                 "--unknown-rule", "novelty", "--novelty-target", "0.2"]) == 0
    wider = pd.read_csv(out, index_col=0)
    assert (wider["is_unknown"] == wider["is_novel"]).all() and wider["is_novel"].sum() >= pred["is_novel"].sum()
    assert main(["transfer", str(two_version_atlas), "-i", str(q), "--batch-key", "tech", "-o", str(out),
                 "--novelty-target", "1.5"]) != 0  # refused with a clear message, not a traceback


def test_transfer_writes_the_format_its_output_names_and_refuses_others(two_version_atlas, tmp_path, pancreas_query,
                                                                       capsys):
    import anndata as ad
    import pandas as pd

    q = tmp_path / "q.h5ad"
    query = pancreas_query.copy()
    query.obs["label"] = "from the study"  # a column named like a prediction's: kept as user_label
    query.write_h5ad(q)
    base = ["transfer", str(two_version_atlas), "-i", str(q), "--batch-key", "tech", "-o"]
    assert main([*base, str(tmp_path / "p.csv")]) == 0
    csv = pd.read_csv(tmp_path / "p.csv", index_col=0)
    assert main([*base, str(tmp_path / "p.tsv"), "-v"]) == 0  # -v after the subcommand too
    tsv = pd.read_csv(tmp_path / "p.tsv", index_col=0, sep="\t")
    assert main([*base, str(tmp_path / "p.parquet")]) == 0
    parquet = pd.read_parquet(tmp_path / "p.parquet")
    assert main([*base, str(tmp_path / "p.h5ad")]) == 0
    back = ad.read_h5ad(tmp_path / "p.h5ad")
    for table in (tsv, parquet, back.obs):
        assert list(table.index) == list(csv.index)
        assert table["predicted_label"].astype(str).tolist() == csv["predicted_label"].astype(str).tolist()
    assert back.X.shape == pancreas_query.shape and "tech" in back.obs  # the query, with its own columns
    assert (back.obs["user_label"] == "from the study").all()
    assert back.obs["label"].astype(str).tolist() == csv["label"].astype(str).tolist()  # the call
    capsys.readouterr()
    assert main([*base, str(tmp_path / "p.xlsx")]) == 2
    assert "cannot tell the format of" in capsys.readouterr().err and not (tmp_path / "p.xlsx").exists()
    before = q.read_bytes()
    assert main([*base, str(q)]) == 2
    assert "is the input file" in capsys.readouterr().err and q.read_bytes() == before


def test_demo_runs_on_the_data_the_package_carries(tmp_path, capsys):
    from atlasengine.datasets import pancreas

    data = pancreas()
    x = data.X.data
    assert data.shape == (500, 2000) and np.all(x == np.round(x)) and x.min() >= 1  # real counts
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 0
    out = capsys.readouterr().out
    assert out.count("cells mapped; known-type accuracy") == 2
    assert out.count("paper's rule (kNN uncertainty > 0.3)") == 2 and out.count("calibrated novelty") == 2
    assert "held-out ductal cells called Unknown" in out
    assert (tmp_path / "audit.html").stat().st_size > 10_000
    assert "report status:" in out and "status" in out.split("report status:")[1].splitlines()[1].lower()
    from atlasengine.cli.demo import _refuse_unless_the_demos

    _refuse_unless_the_demos(tmp_path / "demo.atlas")  # its own atlas: a rerun replaces it
    mine = tmp_path / "mine" / "demo.atlas"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("not the demo's")
    assert main(["demo", "--out", str(mine.parent), "--quick"]) == 2
    assert "is not an atlas the demo wrote" in capsys.readouterr().err and (mine / "notes.txt").exists()


def test_ingest_command_says_the_rule_and_the_share_of_new_cells(atlas_path, tmp_path, pancreas_query, capsys):
    q = tmp_path / "q.h5ad"
    pancreas_query[:60].copy().write_h5ad(q)
    assert main(["ingest", str(atlas_path), "-i", str(q), "--batch-key", "tech", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"version 2 \(ewc\): 60 cells folded in, [\d.]+% called Unknown \(rule: novelty; it finds "
                      r"([\d.]+)% of the cells new to the atlas, 90% interval ([\d.]+)%-([\d.]+)%\)", out)
    assert found, out
    share, low, high = (float(x) for x in found.groups())
    assert low <= share <= high
    assert f"Predictions: atlasengine export {atlas_path} -o out.h5ad" in out


def test_ingest_command_passes_the_penalty_settings_to_this_fold_in_only(atlas_path, tmp_path, pancreas_query):
    q = tmp_path / "q.h5ad"
    pancreas_query[:60].copy().write_h5ad(q)
    assert main(["ingest", str(atlas_path), "-i", str(q), "--batch-key", "tech", "--epochs", "1",
                 "--ewc-lambda", "0", "--embedding-anchor", "500"]) == 0
    run = json.loads((atlas_path / "versions" / "v0002" / "config.json").read_text())
    assert run["continual"]["ewc_lambda"] == 0.0 and run["continual"]["embedding_anchor"] == 500.0
    assert Atlas.open(atlas_path).config.continual.embedding_anchor == 1000.0  # the atlas keeps its own


def test_the_demo_counts_each_rule_by_its_own_call():
    import pandas as pd

    from atlasengine.cli.demo import query_summary

    truth = pd.Series(["ductal"] * 4 + ["alpha"] * 6, index=[f"c{i}" for i in range(10)])
    pred = pd.DataFrame({"label": ["Unknown"] * 2 + ["alpha"] * 8, "predicted_label": "alpha",
                         "uncertainty": [0.9, 0.9, 0.9, 0.1, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1],
                         "is_novel": [True, True, False, False, False, False, False, False, False, False]},
                        index=truth.index)
    pred["is_unknown"] = pred["is_novel"]  # the atlas's default rule decided the labels
    pred.attrs.update(uncertainty_threshold=0.3, novelty_target=0.05)
    _, paper, novelty = query_summary(pred, truth)
    assert "75% of the 4 held-out ductal cells called Unknown, 17% of known cells" in paper
    assert "50% of the 4 held-out ductal cells called Unknown, 0% of known cells" in novelty


def test_ctrl_c_during_training_exits_130_commits_nothing_and_gives_ctrl_c_back(atlas_path, tmp_path, pancreas_query,
                                                                               monkeypatch, capsys):
    """Lightning turns Ctrl-C in ``fit`` into ``exit(1)`` and ignores SIGINT from then on: the engine undoes both."""
    import signal

    from conftest import snapshot

    from atlasengine.training.plan import TrainingPlan

    q = tmp_path / "q.h5ad"
    pancreas_query[:60].copy().write_h5ad(q)
    before, handler = snapshot(atlas_path), signal.getsignal(signal.SIGINT)

    def pressed(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(TrainingPlan, "training_step", pressed)
    assert main(["ingest", str(atlas_path), "-i", str(q), "--batch-key", "tech", "--epochs", "2"]) == 130
    assert "atlasengine: interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is handler  # a second Ctrl-C still stops the program
    after = snapshot(atlas_path)
    assert after.pop("cells.high_water") >= before.pop("cells.high_water")  # staged cells stay unreferenced
    assert after == before  # every committed file byte for byte, no staging left
    reopened = Atlas.open(atlas_path)
    assert reopened.version == 1 and len(reopened.obs()) == 300


def test_outputs_that_would_land_inside_the_atlas_or_nowhere_are_refused_before_any_work(two_version_atlas, tmp_path,
                                                                                           pancreas_query, capsys):
    from conftest import snapshot

    q = tmp_path / "q.h5ad"
    pancreas_query[:60].copy().write_h5ad(q)
    before = snapshot(two_version_atlas)
    for argv in (["export", str(two_version_atlas), "-o", str(two_version_atlas / "manifest.json")],
                 ["export", str(two_version_atlas), "-o", str(two_version_atlas / "versions" / "v0001" / "x.h5ad")],
                 ["transfer", str(two_version_atlas), "-i", str(q), "--batch-key", "tech", "-o",
                  str(two_version_atlas / "predictions.csv")],
                 ["report", str(two_version_atlas), "-o", str(two_version_atlas / "report" / "audit.html")]):
        assert main(argv) == 2, argv
        assert f"inside the atlas {two_version_atlas}" in capsys.readouterr().err
    assert snapshot(two_version_atlas) == before
    website = tmp_path / "site"  # a folder of another tool's manifest.json and versions/ is no atlas
    (website / "versions").mkdir(parents=True)
    (website / "manifest.json").write_text('{"name": "site"}')
    assert main(["export", str(two_version_atlas), "-o", str(website / "atlas.h5ad")]) == 0
    missing = tmp_path / "no" / "such" / "p.csv"
    assert main(["transfer", str(two_version_atlas), "-i", str(q), "--batch-key", "tech", "-o", str(missing)]) == 2
    assert f"the folder {missing.parent} does not exist" in capsys.readouterr().err


def test_duplicate_names_in_a_file_give_one_line_with_the_right_advice(two_version_atlas, tmp_path, pancreas_query,
                                                                         capsys):
    genes = pancreas_query[:20].copy()
    genes.var_names = [genes.var_names[0], *genes.var_names[:-1]]
    cells = pancreas_query[:20].copy()
    cells.obs_names = [cells.obs_names[0], *cells.obs_names[:-1]]
    for name, adata, advice in (("genes", genes, "var_names_make_unique()"), ("cells", cells, "obs_names_make_unique()")):
        path = tmp_path / f"{name}.h5ad"
        adata.write_h5ad(path)
        capsys.readouterr()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a library warning a user would see on the terminal
            assert main(["transfer", str(two_version_atlas), "-i", str(path), "--batch-key", "tech", "-o",
                         str(tmp_path / f"{name}.csv")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("atlasengine: error: duplicate") and advice in err and err.count("\n") == 1, err


def test_errors_name_the_command_lines_options_not_the_apis_keywords(two_version_atlas, tmp_path, pancreas_query,
                                                                      capsys):
    q = tmp_path / "q.h5ad"
    pancreas_query[:40].write_h5ad(q)
    logged = pancreas_query[:40].copy()
    logged.X = np.log1p(logged.X)
    logged.write_h5ad(tmp_path / "logged.h5ad")
    from conftest import snapshot

    before = snapshot(two_version_atlas)
    runs = [
        (["ingest", str(two_version_atlas), "-i", str(q), "--batch-key", "tech", "--dataset", "reference"],
         "pass --dataset <new name>", "dataset="),
        (["transfer", str(two_version_atlas), "-i", str(tmp_path / "logged.h5ad"), "--batch-key", "tech", "-o",
          str(tmp_path / "p.csv")], "the layer that holds them with --layer", "layer="),
        (["create", str(two_version_atlas), "-i", str(q), "--batch-key", "tech", "--label-key", "celltype"],
         "fold data into it with `atlasengine ingest`", "Atlas.open"),
    ]
    for argv, said, not_said in runs:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert said in err and not_said not in err, err
    assert snapshot(two_version_atlas) == before


def test_outputs_are_written_in_the_format_their_names_say_and_cell_lists_may_carry_a_bom(two_version_atlas, tmp_path,
                                                                                          capsys):
    # found by a review: export -o q.csv wrote HDF5, report -o audit.pdf wrote HTML, report made missing
    # folders, and a cell list saved by Excel (UTF-8 with a byte-order mark) missed its first name
    from conftest import snapshot

    before = snapshot(two_version_atlas)
    for argv, said in ((["export", str(two_version_atlas), "-o", str(tmp_path / "q.csv")], "is written as .h5ad"),
                       (["report", str(two_version_atlas), "-o", str(tmp_path / "audit.pdf")], "is written as .html"),
                       (["report", str(two_version_atlas), "-o", str(tmp_path / "no" / "audit.html")],
                        "does not exist")):
        assert main(argv) == 2, argv
        assert said in capsys.readouterr().err
    assert not (tmp_path / "q.csv").exists() and not (tmp_path / "no").exists()
    names = Atlas.open(two_version_atlas).obs().index[:2]
    cells = tmp_path / "cells.txt"
    cells.write_bytes(("\n".join(names) + "\n").encode("utf-8-sig"))
    assert snapshot(two_version_atlas) == before
    copy = tmp_path / "copy.atlas"
    import shutil

    shutil.copytree(two_version_atlas, copy)
    assert main(["relabel", str(copy), "--cells", str(cells), "--label", "named"]) == 0
    assert set(Atlas.open(copy).obs().loc[list(names), "label"]) == {"named"}


def test_an_h5ad_brought_back_keeps_its_old_embedding_aside(two_version_atlas, tmp_path, pancreas_query):
    # found by a review: transfer -o x.h5ad on an earlier export kept the other atlas's embedding under
    # obsm["X_atlasengine"], which scanpy would then use as this atlas's
    q = pancreas_query[:40].copy()
    q.obsm["X_atlasengine"] = np.full((q.n_obs, 3), 7.0)
    path = tmp_path / "q.h5ad"
    q.write_h5ad(path)
    out = tmp_path / "pred.h5ad"
    assert main(["transfer", str(two_version_atlas), "-i", str(path), "--batch-key", "tech", "-o", str(out)]) == 0
    import anndata as ad

    back = ad.read_h5ad(out)
    assert "X_atlasengine" not in back.obsm and (back.obsm["user_X_atlasengine"] == 7.0).all()
    back.obsm["X_atlasengine"] = np.full((back.n_obs, 3), 9.0)  # a second round keeps both earlier ones
    back.write_h5ad(path)
    assert main(["transfer", str(two_version_atlas), "-i", str(path), "--batch-key", "tech", "-o", str(out)]) == 0
    again = ad.read_h5ad(out)
    assert (again.obsm["user_X_atlasengine"] == 7.0).all() and (again.obsm["user_user_X_atlasengine"] == 9.0).all()
