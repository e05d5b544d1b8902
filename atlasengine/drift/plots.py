"""Interactive Plotly figures of the audit report: the 2-d embedding, drift over versions, heatmaps, distributions.

Plotly reads text (trace names, tick labels, hover text) as a small subset of HTML, so every name
goes in through :func:`plain`, which escapes ``&``, ``<`` and ``>``: Plotly shows the name as
written. Nothing is typeset as LaTeX: the report loads no MathJax and the figures' config sets
``typesetMath`` off.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from atlasengine.config import DriftConfig
from atlasengine.drift.summary import mixing_column, mixing_of_first_batches
from atlasengine.numerics import sorted_sample

PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)
MISSING = "#d0d0d0"
MISSING_TEXT = "(none)"
MISSING_NAMES = {MISSING_TEXT, "(unlabelled)"}
"""Category names drawn grey and listed last."""
CONFIG = {"displaylogo": False, "responsive": True, "typesetMath": False,
          "modeBarButtonsToRemove": ["sendChartToCloud", "sendDataToCloud"]}
"""The figures' Plotly config: nothing is sent anywhere and nothing is typeset."""
_LAYOUT = dict(template="none", font=dict(family="system-ui, sans-serif", size=12),
               margin=dict(l=60, r=20, t=50, b=50), paper_bgcolor="white", plot_bgcolor="white")


def plain(value: object) -> str:
    """Return ``value`` as text Plotly shows literally (``&``, ``<``, ``>`` escaped)."""
    return html.escape(str(value), quote=False)


def _layout(fig: go.Figure, title: str, height: int, **more: object) -> go.Figure:
    fig.update_layout(**{**_LAYOUT, **more}, title=dict(text=plain(title), x=0.01, font=dict(size=14)), height=height)
    fig.update_xaxes(automargin=True)
    fig.update_yaxes(automargin=True)  # long names push the plot over instead of being cut
    return fig


def _categories(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Integer codes (the missing value last) and the names they stand for."""
    text = values.astype(object).where(values.notna(), MISSING_TEXT).astype(str)
    names = sorted(text.unique(), key=lambda s: (s in MISSING_NAMES, s))
    codes = pd.Categorical(text, categories=names).codes.astype(np.int16)
    return codes, names


def _discrete_scale(names: list[str]) -> list[list[object]]:
    n = len(names)
    scale = []
    for i, name in enumerate(names):
        colour = MISSING if name in MISSING_NAMES else PALETTE[i % len(PALETTE)]
        scale += [[i / n, colour], [(i + 1) / n, colour]]
    return scale


def _colouring(values: pd.Series, label: str) -> dict[str, object]:
    """Return the ``restyle`` arguments that colour the embedding's points by ``values``."""
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    if numeric:
        v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
        finite = v[np.isfinite(v)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        lo, hi = (lo, hi) if hi > lo else (lo, lo + 1.0)
        # cells with no value are drawn grey: just below the scale's range, where the scale is grey
        step = (hi - lo) / 50
        colour = np.where(np.isfinite(v), v, lo - step).astype(np.float32)
        scale = [[0.0, MISSING], [0.01, MISSING], [0.0101, "#440154"], [0.25, "#3b528b"], [0.5, "#21918c"],
                 [0.75, "#5ec962"], [1.0, "#fde725"]]
        bar = dict(title=dict(text=plain(label)), tickmode="auto", len=1.0)
        return {"marker.color": [colour], "marker.colorscale": [scale], "marker.cmin": lo - step, "marker.cmax": hi,
                "marker.colorbar": [bar]}
    codes, names = _categories(values)
    bar = dict(title=dict(text=plain(label)), tickmode="array", tickvals=list(range(len(names))),
               ticktext=[plain(n) for n in names], len=min(1.0, 0.1 + 0.05 * len(names)))
    return {"marker.color": [codes], "marker.colorscale": [_discrete_scale(names)], "marker.cmin": -0.5,
            "marker.cmax": len(names) - 0.5, "marker.colorbar": [bar]}


HOVER_COLUMNS = ("cell", "label", "batch", "version_added", "predicted", "uncertainty")
"""Columns shown on hover, in order: cell name, cell type, batch, version, predicted label, uncertainty."""


def embedding_figure(umap: pd.DataFrame, method: str, colourings: dict[str, str], n_cells: int) -> go.Figure:
    """Return the 2-d embedding as one scatter trace with a menu that switches what colours the points.

    Parameters
    ----------
    umap
        One row per drawn cell: ``x``, ``y``, the :data:`HOVER_COLUMNS` (missing ones shown
        as "–") and the columns named in ``colourings``.
    method
        The projection's name ("UMAP" or "PCA").
    colourings
        Column -> menu label, in menu order; the first colours the points at load.
    n_cells
        Cells in the atlas (the title says when fewer are drawn).
    """
    def text(column: str) -> np.ndarray:
        if column not in umap.columns:
            return np.full(len(umap), "–", dtype=object)
        values = umap[column]
        if column == "uncertainty":
            v = pd.to_numeric(values, errors="coerce")
            return np.where(v.notna(), v.map(lambda f: f"{f:.3f}"), "–").astype(object)
        return values.astype(object).where(values.notna(), "–").map(plain).to_numpy(dtype=object)

    custom = np.column_stack([text(c) for c in HOVER_COLUMNS])
    hover = ("<b>%{customdata[0]}</b><br>cell type: %{customdata[1]}<br>batch: %{customdata[2]}"
             "<br>version added: %{customdata[3]}<br>predicted label: %{customdata[4]}"
             "<br>uncertainty: %{customdata[5]}<extra></extra>")
    size = float(np.clip(9.0 - np.log10(max(len(umap), 1)) * 1.5, 2.5, 7.0))
    styles = {c: _colouring(umap[c], label) for c, label in colourings.items() if c in umap.columns}
    first = next(iter(styles.values()))
    marker = dict(size=size, opacity=0.85, showscale=True, color=first["marker.color"][0],
                  colorscale=first["marker.colorscale"][0], cmin=first["marker.cmin"], cmax=first["marker.cmax"],
                  colorbar=first["marker.colorbar"][0])
    trace = go.Scatter(x=umap["x"].to_numpy(np.float32), y=umap["y"].to_numpy(np.float32), mode="markers",
                       marker=marker, customdata=custom, hovertemplate=hover, name="cells", showlegend=False)
    fig = go.Figure(trace)
    buttons = [dict(label=plain(colourings[c]), method="restyle", args=[style]) for c, style in styles.items()]
    drawn = f"{len(umap):,} of {n_cells:,} cells drawn (a random sample)" if len(umap) < n_cells \
        else f"all {n_cells:,} cells"
    _layout(fig, f"{method} of the atlas: {drawn}", 620,
            updatemenus=[dict(buttons=buttons, direction="down", x=0.07, xanchor="left", y=1.02, yanchor="bottom",
                              showactive=True)],
            annotations=[dict(text="colour by", x=0.0, xref="paper", y=1.035, yref="paper", showarrow=False,
                              xanchor="left", yanchor="bottom")],
            margin=dict(l=60, r=20, t=100, b=50),
            xaxis=dict(showticklabels=False, showgrid=False, zeroline=False, title=f"{method} 1"),
            yaxis=dict(showticklabels=False, showgrid=False, zeroline=False, title=f"{method} 2"),
            hovermode="closest")
    return fig


def drift_figure(version_drift: pd.DataFrame, batch_drift: pd.DataFrame | None, config: DriftConfig) -> go.Figure:
    """Return the drift measures over versions (four panels, thresholds dashed) from the ``version_drift`` table.

    Panels: mean aligned displacement, mean kNN preservation, leave-one-out label accuracy and
    normalised iLISI (all cells; version 1's cells among themselves, the figure the batch-mixing
    check reads; and each batch from ``batch_drift``, up to 20 batches).
    """
    vd = version_drift.sort_values("version")
    by_scope = {s: g for s, g in vd.groupby("scope")}
    first = by_scope.get("vs_first", vd.iloc[:0])
    prev = by_scope.get("vs_previous", vd.iloc[:0])
    fig = make_subplots(rows=2, cols=2, horizontal_spacing=0.1, vertical_spacing=0.16, subplot_titles=(
        "Mean aligned displacement", "Mean kNN preservation", "Leave-one-out label accuracy",
        "Batch mixing (normalised iLISI)"))
    colours = {"vs version 1": PALETTE[0], "vs previous version": PALETTE[1]}

    def line(df: pd.DataFrame, column: str, name: str, row: int, col: int, dash: str = "solid",
             colour: str | None = None, width: float = 2.0) -> None:
        if len(df) and df[column].notna().any():
            fig.add_trace(go.Scatter(
                x=df["version"], y=df[column].astype(float).round(4), mode="lines+markers", name=plain(name),
                legendgroup=name, showlegend=(row, col) == (1, 1) or name not in colours,
                line=dict(dash=dash, color=colour or colours.get(name), width=width),
                hovertemplate=f"{plain(name)}<br>version %{{x}}: %{{y:.3f}}<extra></extra>"), row=row, col=col)

    for name, df in (("vs version 1", first), ("vs previous version", prev)):
        line(df, "displacement_mean_aligned", name, 1, 1)
        line(df, "knn_preservation_mean", name, 1, 2)
    line(first if len(first) else prev, "label_accuracy_current", "current embedding", 2, 1, colour="#222")
    line(first, "label_accuracy_compared", "version 1 embedding", 2, 1, dash="dash", colour=colours["vs version 1"])
    line(prev, "label_accuracy_compared", "previous embedding", 2, 1, dash="dot",
         colour=colours["vs previous version"])
    line(first if len(first) else prev, "ilisi_norm_mean", "all cells", 2, 2, colour="#222", width=3)
    if batch_drift is not None and not batch_drift.empty:
        versions = sorted(set(batch_drift["version"]))
        among_first = pd.DataFrame({"version": versions, "mixing": [  # not drawn from rows before format 9
            mixing_of_first_batches(batch_drift, v)[1] if mixing_column(batch_drift, v) != "ilisi_mean" else np.nan
            for v in versions]})
        line(among_first, "mixing", "version 1's cells among themselves", 2, 2, dash="dash", colour="#222", width=2)
        for i, (batch, g) in enumerate(batch_drift.sort_values("version").groupby("batch")):
            if i >= 20:
                break
            line(g, "ilisi_norm_mean", f"batch {batch}", 2, 2, colour=PALETTE[(i + 2) % len(PALETTE)], width=1)
    fig.add_hline(y=config.flag_mean_displacement_aligned, line=dict(color="#c0392b", dash="dash", width=1), row=1,
                  col=1)
    fig.add_hline(y=config.flag_knn_preservation_min, line=dict(color="#c0392b", dash="dash", width=1), row=1, col=2)
    fig.update_xaxes(dtick=1, title_text="version", showgrid=True, gridcolor="#eee")
    fig.update_yaxes(showgrid=True, gridcolor="#eee")
    return _layout(fig, "Drift over versions (red dashed: flag threshold)", 620, legend=dict(font=dict(size=11)))


def heatmap(grid: pd.DataFrame, title: str, colour_title: str, xlabel: str, ylabel: str,
            scale: str = "Magma", reverse: bool = True, zmax: float | None = None) -> go.Figure:
    """Return ``grid`` (rows x columns of numbers) as a heatmap with each cell's value on hover."""
    z = grid.to_numpy(dtype=float)
    fig = go.Figure(go.Heatmap(
        z=np.round(z, 4), x=[plain(c) for c in grid.columns], y=[plain(r) for r in grid.index],
        colorscale=scale, reversescale=reverse, zmin=0, zmax=zmax, colorbar=dict(title=dict(text=plain(colour_title))),
        hovertemplate=f"{plain(ylabel)}: %{{y}}<br>{plain(xlabel)}: %{{x}}<br>%{{z:.3f}}<extra></extra>", xgap=1,
        ygap=1))
    height = int(min(1200, 160 + 24 * grid.shape[0]))
    return _layout(fig, title, height, xaxis=dict(title=plain(xlabel), type="category", tickangle=-35),
                   yaxis=dict(title=plain(ylabel), type="category", autorange="reversed"))


def distributions_figure(predictions: pd.DataFrame, annotation: pd.Series | None, uncertainty_threshold: float,
                         novelty_threshold: float | None, max_points: int = 5000, seed: int = 0) -> go.Figure:
    """Return violins of uncertainty and novelty per group of query cells, cut-offs drawn.

    Cells are grouped by the query's own annotation when it has one, else by the predicted
    label; at most ``max_points`` cells are drawn (a seeded sample, said in the title). The
    cut-off of the rule that called Unknown (``predictions.attrs["unknown_rule"]``) is red
    dashed, the other rule's grey dotted.
    """
    rule = predictions.attrs.get("unknown_rule", "uncertainty")
    preds = predictions
    preds = preds.iloc[sorted_sample(len(preds), max_points, seed)]
    annotated = annotation is not None and annotation.reindex(preds.index).notna().any()
    group = (annotation.reindex(preds.index) if annotated else preds["predicted_label"]).astype(object)
    group = group.where(group.notna(), MISSING_TEXT).astype(str)
    panels = [("uncertainty", "kNN uncertainty", uncertainty_threshold)]
    if "novelty" in preds.columns and preds["novelty"].notna().any():
        panels.append(("novelty", "novelty score", novelty_threshold))
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[1] for p in panels], horizontal_spacing=0.08)
    names = sorted(group.unique())
    for col, (column, label, cut) in enumerate(panels, start=1):
        for i, name in enumerate(names):
            values = preds.loc[(group == name).to_numpy(), column].astype(float).round(4)
            fig.add_trace(go.Violin(x=np.full(len(values), plain(name), dtype=object), y=values, name=plain(name),
                                    legendgroup=name, showlegend=False, points="all" if len(values) <= 300 else False,
                                    pointpos=0, jitter=0.4, marker=dict(size=3), line=dict(color=PALETTE[i % 20]),
                                    spanmode="hard", box=dict(visible=True), meanline=dict(visible=False),
                                    hoverinfo="y"), row=1, col=col)
        if cut is not None and np.isfinite(cut):
            used = column == rule
            fig.add_hline(y=float(cut), row=1, col=col, line=dict(color="#c0392b" if used else "#7f8c8d",
                                                                   dash="dash" if used else "dot", width=1))
    by = "the query's annotation" if annotated else "predicted label"
    drawn = f"; {len(preds):,} of {len(predictions):,} cells drawn" if len(preds) < len(predictions) else ""
    fig.update_xaxes(type="category", tickangle=-35)
    other = "; grey dotted: the other rule's" if len(panels) > 1 else ""
    return _layout(fig, f"Uncertainty and novelty by {by} (red dashed: the {rule} cut-off that called Unknown"
                        f"{other}){drawn}", 440)
