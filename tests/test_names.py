"""Labels, batches and values as users send them: plain text everywhere, limits, missing values, reserved names."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import TINY, snapshot

from atlasengine import Atlas, InputError

HOSTILE = {"alpha": "$\\foo$", "beta": "_beta", "ductal": "<script>alert(1)</script>", "delta": "a & b"}


def _small_reference(pancreas_ref):
    keep = np.random.default_rng(0).permutation(pancreas_ref.n_obs)[:150]
    return pancreas_ref[np.sort(keep)].copy()


def test_names_are_plain_text_in_the_report_html_and_figures(tmp_path, pancreas_ref, pancreas_query):
    ref = _small_reference(pancreas_ref)
    ref.obs["celltype"] = ref.obs["celltype"].astype(str).replace(HOSTILE)
    ref.obs["tech"] = ref.obs["tech"].astype(str).replace({"indrop": "$b_1$"})
    atlas = Atlas.create(tmp_path / "a.atlas", ref, batch_key="tech", label_key="celltype",
                         config={**TINY, "reference_training": {"max_epochs": 2}})
    q = pancreas_query[pancreas_query.obs["tech"] == "smartseq2"].copy()
    q.obs["celltype"] = q.obs["celltype"].astype(str).replace(HOSTILE)
    atlas.ingest(q, batch_key="tech", strategy="surgery", label_key="celltype", training={"max_epochs": 1})
    assert set(HOSTILE.values()) <= set(atlas.labels)

    html = atlas.report(tmp_path / "audit.html").read_text()
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "a &amp; b" in html and "$\\foo$" in html
    # in the interactive embedding every name is a tick of the colour menu, escaped for Plotly's text
    data, layout = _figure(html, "fig-embedding")
    ticks = {t for b in layout["updatemenus"][0]["buttons"] for bar in b["args"][0]["marker.colorbar"]
             for t in bar.get("ticktext") or []}
    assert {"_beta", "$\\foo$", "$b_1$", "&lt;script&gt;alert(1)&lt;/script&gt;", "a &amp; b"} <= ticks
    assert not any("<" in t for t in ticks)
    hover = {str(v) for row in data[0]["customdata"] for v in row}
    assert {"$\\foo$", "$b_1$", "_beta"} <= hover and not any("<" in v for v in hover)


def _figure(html: str, div_id: str) -> tuple[list, dict]:
    """The data and layout a report passes to Plotly.newPlot for the figure in ``div_id``."""
    call = html.index("Plotly.newPlot(", html.index(f'id="{div_id}"'))
    at = html.index(f'"{div_id}"', call) + len(div_id) + 2
    decoder = json.JSONDecoder()
    at = html.index("[", at)
    data, end = decoder.raw_decode(html, at)
    layout, _ = decoder.raw_decode(html, html.index("{", end))
    return data, layout


def test_names_longer_than_the_limit_are_refused(tmp_path, pancreas_ref):
    ref = _small_reference(pancreas_ref)
    long = ref.copy()
    long.obs["celltype"] = long.obs["celltype"].astype(str).replace({"alpha": "x" * 20_000})
    with pytest.raises(InputError, match="label column 'celltype' has values longer than 1000 characters"):
        Atlas.create(tmp_path / "a.atlas", long, batch_key="tech", label_key="celltype", config=TINY)
    with pytest.raises(InputError, match="dataset name must be a text of 1 to 1000 characters"):
        Atlas.create(tmp_path / "a.atlas", ref, batch_key="tech", label_key="celltype", dataset="d" * 1001)
    assert not (tmp_path / "a.atlas").exists()


def test_nan_and_none_texts_are_missing_values_and_the_engine_says_so(tmp_path, pancreas_ref, caplog):
    ref = _small_reference(pancreas_ref)
    labels = ref.obs["celltype"].astype(str).to_numpy().copy()
    labels[:3], labels[3:5], labels[5] = "nan", "None", " "  # what .astype(str) makes of NaN and None
    ref.obs["celltype"] = labels
    with caplog.at_level(logging.WARNING, logger="atlasengine"):
        atlas = Atlas.create(tmp_path / "a.atlas", ref, batch_key="tech", label_key="celltype",
                             config={**TINY, "reference_training": {"max_epochs": 1}})
    assert "6 value(s) treated as missing" in caplog.text and "'nan'" in caplog.text
    assert not {"nan", "None", " "} & set(atlas.labels)
    assert atlas.obs()["label"].iloc[:6].isna().all()
    bad = ref.copy()
    bad.obs["tech"] = bad.obs["tech"].astype(str).replace({"indrop": "nan"})
    with pytest.raises(InputError, match="batch column 'tech' has .* missing .*'nan'.* count as missing"):
        Atlas.create(tmp_path / "b.atlas", bad, batch_key="tech", label_key="celltype", config=TINY)


def test_a_cell_type_named_unknown_is_refused_and_the_message_says_what_to_do(tmp_path, pancreas_ref):
    ref = _small_reference(pancreas_ref)
    ref.obs["celltype"] = ref.obs["celltype"].astype(str).replace({"alpha": "Unknown"})
    with pytest.raises(InputError, match="'Unknown', which reads as 'Unknown', the label the engine gives cells it "
                                         "calls Unknown; rename that type"):
        Atlas.create(tmp_path / "a.atlas", ref, batch_key="tech", label_key="celltype", config=TINY)
    ref.obs["celltype"] = ref.obs["celltype"].replace({"Unknown": "unknown "})  # the same to a reader
    with pytest.raises(InputError, match="'unknown ', which reads as 'Unknown'"):
        Atlas.create(tmp_path / "a.atlas", ref, batch_key="tech", label_key="celltype", config=TINY)


def test_cells_without_counts_are_refused_before_anything_is_written(atlas_path, pancreas_query):
    q = pancreas_query[pancreas_query.obs["tech"] == "smartseq2"].copy()
    X = q.X.toarray()
    X[:20] = 0  # 20 empty cells: once called acinar at uncertainty 0.26
    q.X = sp.csr_matrix(X)
    atlas = Atlas.open(atlas_path)
    before = snapshot(atlas_path)
    with pytest.raises(InputError, match="20 cell\\(s\\) have no counts in the atlas's genes"):
        atlas.ingest(q, batch_key="tech", strategy="surgery")
    assert snapshot(atlas_path) == before
    with pytest.raises(InputError, match="20 cell\\(s\\) have no counts"):
        atlas.transfer_labels(q, batch_key="tech")


def test_genes_present_only_in_another_letter_case_are_named(atlas_path, pancreas_query, caplog):
    q = pancreas_query[pancreas_query.obs["tech"] == "smartseq2"].copy()
    names = q.var_names.to_numpy().copy()
    names[:300] = [g.lower() if g.lower() != g else g.upper() for g in names[:300]]  # 15% of the genes
    q.var_names = names
    with caplog.at_level(logging.WARNING, logger="atlasengine"):
        Atlas.open(atlas_path).transfer_labels(q, batch_key="tech")
    assert "300 of the atlas's 2000 genes (15%) are not in the data and count as zero counts" in caplog.text
    assert "300 of them are in the data spelled otherwise (letter case or a version suffix" in caplog.text


def test_absent_genes_and_version_suffixes_are_said(atlas_path, pancreas_query, caplog):
    # 350 genes carrying an Ensembl-style version suffix, 100 more absent: both were zero-filled without a word
    q = pancreas_query[pancreas_query.obs["tech"] == "smartseq2"].copy()
    names = q.var_names.to_numpy().copy()
    plain = np.flatnonzero(["." not in g for g in names])  # genes whose own names carry no suffix-like dot
    names[plain[:350]] = [f"{g}.2" for g in names[plain[:350]]]
    keep = np.setdiff1d(np.arange(len(names)), plain[:100])  # 100 of them absent altogether
    q = q[:, keep].copy()
    q.var_names = names[keep]
    with caplog.at_level(logging.WARNING, logger="atlasengine"):
        Atlas.open(atlas_path).transfer_labels(q, batch_key="tech")
    assert "350 of the atlas's 2000 genes (18%) are not in the data and count as zero counts" in caplog.text
    assert "250 of them are in the data spelled otherwise (letter case or a version suffix, e.g. " in caplog.text
