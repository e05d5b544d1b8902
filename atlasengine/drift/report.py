"""A single self-contained HTML audit report: a summary with a status per check, then interactive figures.

The report opens on what a reader needs first: the atlas, the version and what it added; a
green / amber / red status per drift check against :class:`~atlasengine.config.DriftConfig`
(see :mod:`atlasengine.drift.summary`); and the query's headline (cells, share called Unknown
or novel, the largest groups of Unknown cells). Then come the interactive figures (Plotly: the
2-d embedding with a colour menu and hover, drift over versions, heatmaps), one section per
ingested query, and the tables, rounded and collapsed.

The file needs nothing outside itself: Plotly's JavaScript is inlined once, no MathJax is
loaded, and a Content-Security-Policy forbids the page any request. Every name (cell type,
batch, dataset, cell) is plain text: HTML-escaped in the page and escaped for Plotly's text in
the figures. Numbers come from the drift tables and the predictions; nothing is recomputed.
"""

from __future__ import annotations

import html
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.io as pio
from plotly.offline import get_plotlyjs

from atlasengine.config import DriftConfig
from atlasengine.drift.plots import CONFIG, distributions_figure, drift_figure, embedding_figure, heatmap
from atlasengine.drift.summary import Check, unknown_groups, version_checks, worst
from atlasengine.errors import InputError
from atlasengine.numerics import self_excluding_knn

CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
       "font-src data:; connect-src 'none'")
"""The page's Content-Security-Policy: inline script and style only, no request of any kind."""

_CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1200px;margin:0 auto;padding:1.2em 2em 3em;background:#fff}
h1{font-size:1.55em;margin:.2em 0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
h3{margin:1.2em 0 .4em}.sub{color:#555;margin:.2em 0 1em}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(250px,1fr));gap:12px;margin:.8em 0}
.card{border:1px solid #ddd;border-left:8px solid #999;border-radius:6px;padding:.6em .8em;background:#fff}
.card .name{font-weight:600}.card .value{font-size:1.7em;font-weight:600;margin:.1em 0}
.card .rule,.card .note{font-size:.85em;color:#555}.card .badge{float:right;font-size:.75em;font-weight:700;
padding:1px 8px;border-radius:10px;color:#fff;background:#999;text-transform:uppercase}
.status-green{border-left-color:#2e9d4b}.status-green .badge{background:#2e9d4b}
.status-amber{border-left-color:#e3a21a}.status-amber .badge{background:#e3a21a}
.status-red{border-left-color:#d0392b}.status-red .badge{background:#d0392b}
.kpis{display:flex;flex-wrap:wrap;gap:12px;list-style:none;padding:0;margin:.6em 0}
.kpis li{background:#f3f5f8;border-radius:6px;padding:.5em .9em}.kpis b{font-size:1.4em;display:block}
.scroll{overflow:auto;max-height:480px;border:1px solid #eee;margin:.4em 0}
table{border-collapse:collapse;font-size:.85em;margin:0}
th,td{border:1px solid #e3e3e3;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f2f2f2;position:sticky;top:0}td.s{text-align:left;white-space:normal}tr.flag td{background:#ffe1de}
ul.kv{list-style:none;margin:0;padding:0;text-align:left}ul.kv li{white-space:nowrap}ul.kv span{color:#666}
details{margin:.6em 0}summary{cursor:pointer;color:#1a5fb4}.muted{color:#777}.ok{color:#2a7a2a}
.plot{border:1px solid #eee;margin:.6em 0}.note{color:#555;font-size:.9em}
nav a{margin-right:1em}
"""

_FLAG_TEXT = {
    "displacement_mean_aligned": ("mean aligned displacement", ">"),
    "knn_preservation_mean": ("mean kNN preservation", "<"),
    "label_accuracy_drop": ("drop in leave-one-out label accuracy", ">"),
}
_STATUS_TEXT = {"green": "ok", "amber": "watch", "red": "flag", "grey": "no value"}
UMAP_COLOURINGS = {
    "label": "cell type", "batch": "batch", "version_added": "version added", "predicted": "predicted label",
    "call": "transfer call", "uncertainty": "uncertainty", "displacement": "displacement from version 1",
}
"""Columns of the ``umap`` frame the colour menu offers (those present), and their menu labels."""


@dataclass
class QueryView:
    """One ingested query as the report shows it.

    ``predictions`` is the transfer's table (``label``, ``predicted_label``, ``uncertainty``,
    ``is_unknown``, optional ``novelty`` / ``is_novel``; thresholds and rule in ``attrs``),
    indexed by cell; ``annotation`` the query's own labels by cell (None: none given).
    """

    version: int
    dataset: str
    predictions: pd.DataFrame
    annotation: pd.Series | None = None


@dataclass
class Report:
    """A written report: its file, the checks of its version, the worst status and the headline lines."""

    path: Path
    version: int | None
    checks: list[Check] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        """Return the worst status of the checks: green, amber, red (grey when there is none)."""
        return worst(self.checks)


# --------------------------------------------------------------------------- 2-d coordinates


def umap_coordinates(
    embedding: np.ndarray, seed: int = 0, return_method: bool = False
) -> np.ndarray | tuple[np.ndarray, str]:
    """2-d coordinates of ``embedding``: UMAP (umap-learn) when importable, else PCA.

    With ``return_method=True`` returns ``(coords, "UMAP" | "PCA")``; pass the method to
    :func:`render_report` (or set ``umap_frame.attrs["method"]``) so figure titles name it.
    """
    x = np.asarray(embedding, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise InputError(f"embedding must be a non-empty 2-d array, got shape {x.shape}")
    coords, method = None, "PCA"
    if x.shape[0] > 16 and x.shape[1] > 2:
        try:
            with warnings.catch_warnings():  # umap's tip that TensorFlow (ParametricUMAP) is not installed
                warnings.filterwarnings("ignore", category=ImportWarning)
                import umap  # type: ignore[import-not-found]

            # the neighbours from faiss (the engine's own kNN): UMAP's own search (pynndescent) spends
            # about 35 s compiling with numba in every new process before it finds any
            k = min(15, x.shape[0] - 1)
            dist, found = self_excluding_knn(x, k - 1)
            n = x.shape[0]
            knn = (np.column_stack([np.arange(n), found]), np.column_stack([np.zeros(n, np.float32), dist]), None)
            reducer = umap.UMAP(n_components=2, n_neighbors=k, random_state=seed, precomputed_knn=knn)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*n_jobs.*", category=UserWarning)
                warnings.filterwarnings("ignore", message=r".*precomputed_knn\[2\].*", category=UserWarning)
                coords, method = np.asarray(reducer.fit_transform(x), dtype=np.float64), "UMAP"
        except ImportError:
            coords = None
    if coords is None:
        coords = _pca2(x)
    return (coords, method) if return_method else coords


def _pca2(x: np.ndarray) -> np.ndarray:
    xc = np.asarray(x, dtype=np.float64) - x.mean(axis=0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    out = xc @ vt[:2].T
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1]))) if out.shape[1] < 2 else out


# --------------------------------------------------------------------------- text and numbers


def _e(value: object) -> str:
    return html.escape(str(value))


def _num(value: object) -> str:
    """Format a number as the tables show it: integers with separators, other numbers to 3 decimals or fewer."""
    if value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and not np.isfinite(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    v = float(value)
    if v == int(v) and abs(v) >= 1000:
        return f"{int(v):,}"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.2f}" if abs(v) >= 10 else f"{v:.3f}"


def _pct(value: float) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{100 * value:.1f}%"


def _kv(value: object) -> str:
    """Render a JSON object (or dict) as a key-value list; anything else as text."""
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return '<span class="muted">–</span>'
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return _e(value)
    if isinstance(value, dict):
        if not value:
            return '<span class="muted">–</span>'
        items = "".join(f"<li><span>{_e(k)}</span> {_e(_num(v) if isinstance(v, (int, float)) else v)}</li>"
                        for k, v in value.items())
        return f'<ul class="kv">{items}</ul>'
    if isinstance(value, list):
        return _e(", ".join(str(v) for v in value))
    return _e(value)


def _cell(value: object, kind: str) -> str:
    if kind == "html":
        return f'<td class="s">{value}</td>'
    if kind == "pct":
        return f"<td>{_pct(float(value)) if value is not None and not pd.isna(value) else '–'}</td>"
    if isinstance(value, (int, float, np.integer, np.floating, bool, np.bool_)) or value is None or value is pd.NA:
        text = _num(value)
        return f'<td class="muted">{text}</td>' if text == "–" else f"<td>{text}</td>"
    return f'<td class="s">{_e(value)}</td>'


def _table(df: pd.DataFrame | None, names: dict[str, str] | None = None, kinds: dict[str, str] | None = None,
           flagged: np.ndarray | None = None, scroll: bool = True) -> str:
    """Render ``df`` (columns renamed by ``names``; ``kinds``: "pct" or "html" per column) as an HTML table."""
    if df is None or df.empty:
        return '<p class="muted">No rows.</p>'
    names, kinds = names or {}, kinds or {}
    columns = [c for c in (names or df.columns) if c in df.columns]
    head = "".join(f"<th>{_e(names.get(c, c))}</th>" for c in columns)
    rows = []
    for i, values in enumerate(df[columns].itertuples(index=False)):
        cls = ' class="flag"' if flagged is not None and flagged[i] else ""
        rows.append(f"<tr{cls}>{''.join(_cell(v, kinds.get(c, '')) for c, v in zip(columns, values))}</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    return f'<div class="scroll">{table}</div>' if scroll else table


def _details(summary: str, body: str, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{_e(summary)}</summary>{body}</details>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>\n{body}\n</section>\n'


def _plot(fig, name: str) -> str:
    """One figure as a div (id ``fig-<name>``) and its script; Plotly's JavaScript is in the page head once."""
    return '<div class="plot">' + pio.to_html(fig, include_plotlyjs=False, include_mathjax=False, full_html=False,
                                               config=CONFIG, div_id=f"fig-{name}", default_height=f"{fig.layout.height}px",
                                               default_width="100%") + "</div>"


# --------------------------------------------------------------------------- summary


def _card(check: Check) -> str:
    value = "–" if not np.isfinite(check.value) else f"{check.value:.3f}"
    return (f'<div class="card status-{check.status}" data-check="{_e(check.measure)}" data-status="{check.status}">'
            f'<span class="badge">{_STATUS_TEXT[check.status]}</span><div class="name">{_e(check.name)}</div>'
            f'<div class="value">{value}</div><div class="rule">{_e(check.rule)}</div>'
            f'<div class="note">{_e(check.note)}</div></div>')


def _query_numbers(q: QueryView) -> tuple[int, float, float]:
    p = q.predictions
    novel = float(p["is_novel"].astype(float).mean()) if "is_novel" in p.columns and p["is_novel"].notna().any() \
        else float("nan")
    return len(p), float(p["is_unknown"].astype(bool).mean()) if len(p) else float("nan"), novel


def _rule_text(p: pd.DataFrame) -> str:
    if p.attrs.get("unknown_rule") == "novelty":
        return f"calibrated novelty, {p.attrs.get('novelty_target', float('nan')):.0%} false-alarm target"
    return f"kNN uncertainty above {p.attrs.get('uncertainty_threshold', float('nan')):.2g}"


def _group_items(groups: pd.DataFrame, method: str, limit: int = 5) -> str:
    items = []
    for g in groups.head(limit).itertuples(index=False):
        where = f"; they sit around ({g.x:.1f}, {g.y:.1f}) in the {method}" if np.isfinite(g.x) else ""
        annotated = f"; annotated by the query as {_e(g.annotated_as)}" if g.annotated_as else ""
        items.append(f"<li><b>{int(g.n_cells):,}</b> cells nearest to <b>{_e(g.nearest_label)}</b> "
                     f"({g.share:.0%} of the Unknown cells), median uncertainty {g.uncertainty_median:.2f}"
                     f"{annotated}{where}</li>")
    more = f'<p class="muted">{len(groups) - limit} smaller group(s) in the query\'s section.</p>' \
        if len(groups) > limit else ""
    see = (f'<p class="note">Colour the {_e(method)} below by "transfer call" to see where the Unknown cells '
           "sit.</p>")
    return f'<ol class="groups">{"".join(items)}</ol>{more}{see}'


def _headline_query(q: QueryView | None, groups: pd.DataFrame | None, method: str,
                    strategy: str | None = None) -> tuple[str, list[str]]:
    if q is None:
        what = ("it relabelled cells of earlier versions" if strategy == "relabel"
                else "the reference has no transfer" if strategy in (None, "reference") else f"strategy {strategy}")
        return (f'<p class="muted">This version folded in no query ({_e(what)}); see the query '
                "sections below for earlier ones.</p>"), []
    n, unknown, novel = _query_numbers(q)
    kpis = [f"<li><b>{n:,}</b>cells of {_e(q.dataset)}</li>",
            f'<li data-kpi="unknown"><b>{_pct(unknown)}</b>called Unknown ({_e(_rule_text(q.predictions))})</li>']
    if np.isfinite(novel):
        kpis.append(f'<li data-kpi="novel"><b>{_pct(novel)}</b>novel (calibrated novelty score)</li>')
    lines = [f"query {q.dataset}: {n:,} cells, {_pct(unknown)} called Unknown"
             + (f", {_pct(novel)} novel" if np.isfinite(novel) else "")]
    body = f'<h3>What the query brought: {_e(q.dataset)}</h3><ul class="kpis">{"".join(kpis)}</ul>'
    if groups is not None and len(groups):
        body += ("<p>Largest groups of Unknown cells, by the reference label they were nearest to before the "
                 "cut-off:</p>" + _group_items(groups, method))
        top = groups.iloc[0]
        lines.append(f"largest Unknown group: {int(top.n_cells)} cells nearest to {top.nearest_label}")
    else:
        body += '<p class="ok">No cell of this query was called Unknown.</p>'
    return body, lines


def _summary(version: int | None, versions: pd.DataFrame | None, checks: list[Check], atlas: str, title: str,
             n_versions: int) -> str:
    sub = [f"Atlas <b>{_e(atlas)}</b>"]
    row = None
    if versions is not None and version is not None and (versions["version"] == version).any():
        row = versions[versions["version"] == version].iloc[0]
    if version is not None:
        sub.append(f"version <b>{version}</b>" + (f" (versions 1 to {n_versions} shown)" if n_versions > 1 else ""))
    if row is not None:
        sub.append(f"made {pd.Timestamp(row['created_at']):%Y-%m-%d %H:%M} UTC with <b>{_e(row['strategy'])}</b>")
        added = _added(versions, version)
        if added:
            sub.append(f"added <b>{_e(', '.join(added))}</b> ({_num(row['n_new_cells'])} cells)")
        sub.append(f"{_num(row['n_cells'])} cells in all")
    cards = "".join(_card(c) for c in checks) or '<p class="muted">No drift rows for this version.</p>'
    legend = ('<p class="note">Green: within the threshold. Amber: within it, but some cell type is past it or the '
              "value is within 20% of it. Red: past it. Thresholds are the atlas's drift settings.</p>")
    return (f"<h1>{_e(title)}</h1><p class=\"sub\">{' · '.join(sub)}</p>"
            f'<section id="summary"><h2>Summary</h2><div class="cards" id="checks" data-status="{worst(checks)}">'
            f"{cards}</div>{legend}")


def _added(versions: pd.DataFrame, version: int) -> list[str]:
    def names(v: int) -> list[str]:
        rows = versions[versions["version"] == v]
        if rows.empty or rows.iloc[0]["datasets"] is None or pd.isna(rows.iloc[0]["datasets"]):
            return []
        value = rows.iloc[0]["datasets"]
        try:
            parsed = json.loads(value) if isinstance(value, str) else value
        except ValueError:
            return [str(value)]
        return [str(d) for d in parsed] if isinstance(parsed, list) else [str(parsed)]

    before = set(names(version - 1))
    return [d for d in names(version) if d not in before]


# --------------------------------------------------------------------------- sections

_VD_NAMES = {
    "version": "version", "scope": "compared with", "n_cells": "cells", "n_cells_knn": "cells in kNN sample",
    "displacement_mean_aligned": "displacement (mean, aligned)",
    "displacement_median_aligned": "displacement (median, aligned)",
    "displacement_mean_raw": "displacement (mean, raw)", "knn_preservation_mean": "kNN preservation",
    "label_accuracy_current": "label accuracy now", "label_accuracy_compared": "label accuracy then",
    "ilisi_mean": "iLISI", "ilisi_norm_mean": "iLISI (normalised)",
}
_CD_NAMES = {
    "version": "version", "scope": "compared with", "cell_type": "cell type", "n_cells": "cells",
    "n_cells_knn": "cells in kNN sample", "displacement_mean_aligned": "displacement (mean, aligned)", "centroid_shift_aligned": "centroid shift (aligned)",
    "knn_preservation_mean": "kNN preservation", "label_accuracy_current": "label accuracy now",
    "label_accuracy_compared": "label accuracy then",
}
_BD_NAMES = {
    "version": "version", "batch": "batch", "n_cells": "cells", "ilisi_mean": "iLISI (all cells)",
    "ilisi_norm_mean": "iLISI (all cells, normalised)", "ilisi_first_version_mean": "iLISI (among version 1's cells)",
    "displacement_aligned_vs_previous_mean": "displacement vs previous",
    "displacement_aligned_vs_first_mean": "displacement vs version 1",
}
_SCOPE = {"vs_first": "version 1 (its cells)", "vs_previous": "previous version"}


def _flag_list(fl: pd.DataFrame | None) -> str:
    if fl is None or fl.empty:
        return '<p class="ok">No version crossed a flag threshold.</p>'
    order = fl.assign(_whole=fl["cell_type"].isna()).sort_values(
        ["version", "_whole", "measure", "scope", "cell_type"], ascending=[False, False, True, True, True])
    rows = pd.DataFrame({
        "version": order["version"].astype(int).to_numpy(),
        "where": ["all cells" if c is None or pd.isna(c) else f"cell type {c}" for c in order["cell_type"]],
        "compared with": order["scope"].map(_SCOPE).fillna(order["scope"]).to_numpy(),
        "measure": [_FLAG_TEXT.get(m, (m, ""))[0] for m in order["measure"]],
        "value": order["value"].to_numpy(dtype=float),
        "rule": [f"{_FLAG_TEXT.get(m, (m, 'vs'))[1]} {t:.3g}" for m, t in zip(order["measure"], order["threshold"])],
    })
    whole = int(order["_whole"].sum())
    text = f"{len(rows)} flag(s): {whole} for whole versions, {len(rows) - whole} for cell types"
    return _details(text, _table(rows), open_=len(rows) <= 8)


def _drift_section(vd: pd.DataFrame | None, bd: pd.DataFrame | None, cd: pd.DataFrame | None,
                   fl: pd.DataFrame | None, config: DriftConfig) -> str:
    if vd is None or vd.empty:
        return ""
    body = _plot(drift_figure(vd, bd, config), "drift-over-versions") + "<h3>Flags</h3>" + _flag_list(fl)
    whole = set() if fl is None or fl.empty else set(
        zip(fl.loc[fl["cell_type"].isna(), "version"].astype(int), fl.loc[fl["cell_type"].isna(), "scope"]))
    vd = vd.assign(_flag=[(int(v), s) in whole for v, s in zip(vd["version"], vd["scope"])])
    vd = vd.sort_values(["_flag", "version", "scope"], ascending=[False, False, True]).reset_index(drop=True)
    shown = vd.assign(scope=vd["scope"].map(_SCOPE).fillna(vd["scope"]))
    body += _details(f"Drift measures per version ({len(vd)} rows, flagged first)",
                     _table(shown, _VD_NAMES, flagged=vd["_flag"].to_numpy()))
    return _section("drift", "Drift over versions", body)


def _celltype_section(cd: pd.DataFrame | None, fl: pd.DataFrame | None) -> str:
    if cd is None or cd.empty:
        return ""
    body = ""
    sub = cd[cd["scope"] == "vs_first"]
    if not sub.empty and sub["version"].nunique() > 1:
        grid = sub.pivot_table(index="cell_type", columns="version", values="displacement_mean_aligned")
        body += _plot(heatmap(grid, "Mean aligned displacement from version 1, per cell type", "displacement",
                              "version", "cell type"), "celltype-heatmap")
    typed = set() if fl is None or fl.empty else set(zip(
        fl.loc[fl["cell_type"].notna(), "version"].astype(int), fl.loc[fl["cell_type"].notna(), "scope"],
        fl.loc[fl["cell_type"].notna(), "cell_type"].astype(str)))
    cd = cd.assign(_flag=[(int(v), s, str(c)) in typed for v, s, c in zip(cd["version"], cd["scope"],
                                                                             cd["cell_type"])])
    cd = cd.sort_values(["_flag", "version", "scope", "cell_type"], ascending=[False, False, True, True])
    cd = cd.reset_index(drop=True)
    n_flag = int(cd["_flag"].sum())
    shown = cd.assign(scope=cd["scope"].map(_SCOPE).fillna(cd["scope"]))
    body += _details(f"Per cell type table ({len(cd)} rows, {n_flag} flagged, shown first)",
                     _table(shown, _CD_NAMES, flagged=cd["_flag"].to_numpy()))
    return _section("celltypes", "Per cell type", body)


def _batch_section(bd: pd.DataFrame | None) -> str:
    if bd is None or bd.empty:
        return ""
    bd = bd.sort_values(["version", "batch"], ascending=[False, True])
    return _section("batches", "Per batch", _details(f"Per batch table ({len(bd)} rows)", _table(bd, _BD_NAMES)))


def _versions_section(versions: pd.DataFrame | None) -> str:
    if versions is None or versions.empty:
        return ""
    v = versions.sort_values("version", ascending=False)
    shown = pd.DataFrame({
        "version": v["version"].astype(int).to_numpy(),
        "made (UTC)": [f"{pd.Timestamp(t):%Y-%m-%d %H:%M}" if pd.notna(t) else "–" for t in v["created_at"]],
        "strategy": v["strategy"].to_numpy(),
        "added": [_e(", ".join(_added(versions, int(n)))) for n in v["version"]],
        "cells": v["n_cells"].to_numpy(), "new cells": v["n_new_cells"].to_numpy(),
        "training (s)": v["train_seconds"].to_numpy(dtype=float),
        "settings": [_kv(p) for p in v["parameters"]],
    })
    return _section("versions", "Version history",
                    _table(shown, kinds={"added": "html", "settings": "html"}))


def _transfer_table(ts: pd.DataFrame) -> str:
    """Per query cell type: cells, where most went, and the share called Unknown."""
    rows = []
    for qtype, g in ts.groupby("query_cell_type", dropna=False, sort=True):
        g = g.sort_values("n_cells", ascending=False)
        unknown = g.loc[g["assigned_label"] == "Unknown", "share"].sum()
        top = g.iloc[0]
        rows.append({"query cell type": "(unlabelled)" if pd.isna(qtype) else qtype,
                     "cells": int(g["n_cells"].sum()), "mostly assigned": top["assigned_label"],
                     "share": float(top["share"]), "called Unknown": float(unknown)})
    df = pd.DataFrame(rows).sort_values("cells", ascending=False)
    return _table(df, kinds={"share": "pct", "called Unknown": "pct"})


def _query_section(q: QueryView, ts: pd.DataFrame | None, groups: pd.DataFrame, method: str) -> str:
    p = q.predictions
    n, unknown, novel = _query_numbers(q)
    anchor = f"query-v{q.version}"
    kpis = [f"<li><b>{n:,}</b>cells</li>", f"<li><b>{_pct(unknown)}</b>called Unknown ({_e(_rule_text(p))})</li>"]
    if np.isfinite(novel):
        kpis.append(f"<li><b>{_pct(novel)}</b>novel</li>")
    body = f'<ul class="kpis">{"".join(kpis)}</ul>'
    if ts is not None and not ts.empty:
        body += "<h3>Transfer summary</h3>" + _transfer_table(ts)
        grid = ts.pivot_table(index="query_cell_type", columns="assigned_label", values="share", fill_value=0.0)
        if grid.size > 1:
            body += _plot(heatmap(grid, "Assignment: share of each query cell type given each label", "share",
                                  "assigned label", "query cell type", scale="Blues", reverse=False, zmax=1.0),
                          f"{anchor}-assignment")
    note = p.attrs.get("novelty_threshold")
    body += _plot(distributions_figure(p, q.annotation, float(p.attrs.get("uncertainty_threshold", np.nan)),
                                       float(note) if note is not None else None), f"{anchor}-distributions")
    body += "<h3>Unknown groups</h3>"
    if groups.empty:
        body += '<p class="ok">No cell was called Unknown.</p>'
    else:
        body += ("<p class=\"note\">Cells called Unknown, grouped by the reference label nearest to them before "
                 f"the cut-off; position: the median of the group's cells drawn in the {_e(method)}.</p>")
        body += _table(groups, {"nearest_label": "nearest label", "n_cells": "cells", "share": "share of Unknown",
                                "uncertainty_median": "median uncertainty", "novelty_median": "median novelty",
                                "annotated_as": "annotated by the query as", "x": f"{method} x", "y": f"{method} y"},
                       kinds={"share": "pct"})
    return _section(anchor, f"Query of version {q.version}: {q.dataset}", body)


def _umap_section(umap: pd.DataFrame, method: str, n_cells: int) -> str:
    missing = {"x", "y"} - set(umap.columns)
    if missing:
        raise InputError(f"umap frame lacks column(s) {sorted(missing)}")
    colourings = {c: label for c, label in UMAP_COLOURINGS.items() if c in umap.columns}
    if not colourings:
        umap = umap.assign(version_added="–")
        colourings = {"version_added": "version added"}
    note = (f'<p class="note">Hover a point for its cell, type, batch, predicted label and uncertainty; the menu '
            f"switches what colours the points. {len(umap):,} of {n_cells:,} cells are drawn"
            + (" (a random sample, to keep the file small)." if len(umap) < n_cells else ".") + "</p>")
    return _section("embedding", f"Embedding ({method})",
                    note + _plot(embedding_figure(umap, method, colourings, n_cells), "embedding"))


def render_report(
    path: str | Path,
    tables_by_name: dict[str, pd.DataFrame],
    umap: pd.DataFrame | None,
    queries: Sequence[QueryView] | None,
    title: str,
    umap_method: str | None = None,
    config: DriftConfig | None = None,
    atlas_name: str = "",
    version: int | None = None,
    n_cells: int | None = None,
) -> Report:
    """Write the drift audit report to ``path`` (one self-contained HTML file).

    Parameters
    ----------
    path
        The file to write.
    tables_by_name
        DriftStore tables by name (``versions``, ``version_drift``, ``celltype_drift``,
        ``batch_drift``, ``drift_flags``, ``transfer_summary``); missing ones are left out.
    umap
        The drawn cells: ``x``, ``y`` and any of ``cell``, ``label``, ``batch``,
        ``version_added``, ``predicted``, ``call``, ``uncertainty``, ``displacement``.
    queries
        The ingested queries, one per version that folded one in.
    title
        The page's title.
    umap_method
        The projection's name (else ``umap.attrs["method"]``, else "UMAP").
    config
        The thresholds of the checks (default: :class:`DriftConfig` defaults).
    atlas_name
        The atlas as the summary names it.
    version
        The version the summary describes (default: the newest in ``versions``).
    n_cells
        Cells in the atlas, when ``umap`` draws a sample of them.

    Returns
    -------
    Report
        The file, the checks of ``version`` and the headline lines.
    """
    config = config or DriftConfig()
    get = tables_by_name.get
    versions, vd, cd = get("versions"), get("version_drift"), get("celltype_drift")
    bd, fl, ts = get("batch_drift"), get("drift_flags"), get("transfer_summary")
    if version is None and versions is not None and not versions.empty:
        version = int(versions["version"].max())
    method = umap_method or (umap.attrs.get("method", "UMAP") if umap is not None else "UMAP")
    checks = version_checks(vd, fl, config, version, bd) if version is not None else []
    queries = sorted(queries or [], key=lambda q: q.version)
    coords = None
    if umap is not None and "cell" in umap.columns:
        coords = umap.set_index(umap["cell"].astype(str))[["x", "y"]]
    groups = {q.version: unknown_groups(q.predictions, q.annotation, coords) for q in queries}
    current = next((q for q in queries if q.version == version), None)
    made_with = None
    if versions is not None and version is not None and "strategy" in versions.columns:
        row = versions[versions["version"] == version]
        made_with = str(row["strategy"].iloc[0]) if len(row) else None
    query_html, query_lines = _headline_query(current, groups.get(version), method, made_with)
    n_versions = int(versions["version"].nunique()) if versions is not None and not versions.empty else 0
    headline = [f"status {worst(checks)}: "
                + ", ".join(f"{c.name[0].lower() + c.name[1:]} {c.status} ({'–' if not np.isfinite(c.value) else f'{c.value:.3g}'})"
                            for c in checks)] \
        + [f"{c.name} is {c.status}: {c.note}" for c in checks if c.status in ("amber", "red")] + query_lines
    parts = [_summary(version, versions, checks, atlas_name, title, n_versions) + query_html + "</section>"]
    nav = ['<a href="#summary">Summary</a>']
    if umap is not None and not umap.empty:
        parts.append(_umap_section(umap, method, max(n_cells or len(umap), len(umap))))
        nav.append('<a href="#embedding">Embedding</a>')
    drift = _drift_section(vd, bd, cd, fl, config)
    if drift:
        parts.append(drift)
        nav.append('<a href="#drift">Drift</a>')
    celltypes = _celltype_section(cd, fl)
    if celltypes:
        parts.append(celltypes)
        nav.append('<a href="#celltypes">Cell types</a>')
    parts.append(_batch_section(bd))
    for q in reversed(queries):
        rows = None if ts is None or ts.empty else ts[ts["version"] == q.version]
        parts.append(_query_section(q, rows, groups[q.version], method))
        nav.append(f'<a href="#query-v{q.version}">Query v{q.version}</a>')
    parts.append(_versions_section(versions))
    nav.append('<a href="#versions">Versions</a>')

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        plotly_js = get_plotlyjs()
    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style>"
        f'<script type="text/javascript">{plotly_js}</script></head><body><main>\n'
        f"<nav>{''.join(nav)}</nav>\n" + "\n".join(p for p in parts if p) + "\n</main></body></html>\n"
    )
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write the report to {path}: {exc.strerror or exc}") from exc
    return Report(path, version, checks, headline)
