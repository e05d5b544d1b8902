"""A single self-contained HTML audit report of drift across versions.

Every name (cell type, batch, dataset) is plain text: HTML-escaped in the page, literal in the
figures (see :mod:`atlasengine.figures`).

Figures are matplotlib PNGs (drawn on ``matplotlib.figure.Figure``, i.e. the Agg canvas,
without touching pyplot's global backend) embedded as base64 data URIs; CSS is inline; the
file references nothing outside itself.
"""

from __future__ import annotations

import base64
import html
import io
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from atlasengine.errors import InputError
from atlasengine.figures import plain_text

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f2f2f2}td.s{text-align:left}tr.flag td{background:#ffd9d6}
.figs{display:flex;flex-wrap:wrap;gap:10px}.figs img{max-width:560px;border:1px solid #eee}
.flaglist li{margin:.2em 0}.ok{color:#2a7a2a}.muted{color:#777}
"""

_FLAG_TEXT = {
    "displacement_mean_aligned": ("mean aligned displacement", ">"),
    "knn_preservation_mean": ("mean kNN preservation", "<"),
    "label_accuracy_drop": ("drop in leave-one-out label accuracy", ">"),
}


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
            import umap  # type: ignore[import-not-found]

            reducer = umap.UMAP(n_components=2, n_neighbors=min(15, x.shape[0] - 1), random_state=seed)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*n_jobs.*", category=UserWarning)
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


# --------------------------------------------------------------------------- figures


def _data_uri(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        mime = "image/png"
    elif data[:3] == b"\xff\xd8\xff":
        mime = "image/jpeg"
    else:
        raise InputError("figures must be PNG or JPEG bytes")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def _img(data: bytes, alt: str) -> str:
    return f'<img src="{_data_uri(data)}" alt="{html.escape(alt)}">'


def _line_figures(vd: pd.DataFrame, bd: pd.DataFrame) -> list[tuple[str, bytes]]:
    """Measures over versions: displacement, preservation, label accuracy, iLISI."""
    out: list[tuple[str, bytes]] = []
    vd = vd.sort_values("version")
    by_scope = {s: g for s, g in vd.groupby("scope")}
    first = by_scope.get("vs_first", vd.iloc[:0])
    prev = by_scope.get("vs_previous", vd.iloc[:0])

    def figure(title: str, ylabel: str, series: list[tuple[str, pd.DataFrame, str, dict]]) -> bytes:
        fig = Figure(figsize=(5.6, 3.4))
        ax = fig.subplots()
        for label, df, column, style in series:
            if len(df) and df[column].notna().any():
                ax.plot(df["version"], df[column], marker="o", label=label, **style)
        ax.set_title(title)
        ax.set_xlabel("version")
        ax.set_ylabel(ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        return _png(fig)

    out.append(("mean aligned displacement", figure(
        "Mean displacement after Procrustes alignment", "latent distance",
        [("vs version 1", first, "displacement_mean_aligned", {}),
         ("vs previous version", prev, "displacement_mean_aligned", {})])))
    out.append(("kNN preservation", figure(
        "Mean kNN preservation", "share of neighbours kept",
        [("vs version 1", first, "knn_preservation_mean", {}),
         ("vs previous version", prev, "knn_preservation_mean", {})])))
    out.append(("label accuracy", figure(
        "Leave-one-out kNN label accuracy", "accuracy",
        [("current embedding", first if len(first) else prev, "label_accuracy_current", {}),
         ("version 1 embedding", first, "label_accuracy_compared", {"linestyle": "--"}),
         ("previous embedding", prev, "label_accuracy_compared", {"linestyle": ":"})])))
    series = [("all cells", first if len(first) else prev, "ilisi_mean", {"linewidth": 2.5, "color": "k"})]
    if bd is not None and not bd.empty:
        for batch, g in bd.sort_values("version").groupby("batch"):
            series.append((f"batch {batch}", g, "ilisi_mean", {"linewidth": 1, "alpha": 0.7}))
    out.append(("iLISI", figure("Batch mixing (iLISI, 1 = one batch)", "iLISI", series[:21])))
    return out


def _heatmap(cd: pd.DataFrame) -> bytes | None:
    """Aligned displacement vs version 1 per cell type x version."""
    if cd is None or cd.empty:
        return None
    sub = cd[cd["scope"] == "vs_first"]
    if sub.empty:
        return None
    grid = sub.pivot_table(index="cell_type", columns="version", values="displacement_mean_aligned")
    fig = Figure(figsize=(1.2 + 0.7 * grid.shape[1], 1.0 + 0.32 * grid.shape[0]))
    ax = fig.subplots()
    im = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="magma_r")
    ax.set_xticks(range(grid.shape[1]), [str(v) for v in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [str(v) for v in grid.index])
    ax.set_xlabel("version")
    ax.set_title("Mean aligned displacement vs version 1")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _png(fig)


def _scatter(umap: pd.DataFrame, column: str, method: str) -> bytes:
    fig = Figure(figsize=(5.4, 4.4))
    ax = fig.subplots()
    values = umap[column]
    point = max(1.0, min(12.0, 3000.0 / max(len(umap), 1)))
    if column == "displacement":
        v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
        nan = ~np.isfinite(v)
        ax.scatter(umap["x"][nan], umap["y"][nan], s=point, c="#cccccc", label="no value", linewidths=0)
        sc = ax.scatter(umap["x"][~nan], umap["y"][~nan], s=point, c=v[~nan], cmap="viridis", linewidths=0)
        fig.colorbar(sc, ax=ax, shrink=0.8, label="aligned displacement")
        if nan.any():
            ax.legend(fontsize=7, markerscale=3)
    else:
        cats = values.astype(object).where(values.notna(), "(missing)").astype(str)
        names = sorted(cats.unique(), key=lambda s: (s == "(missing)", s))
        cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
        handles = []
        for i, name in enumerate(names):
            m = (cats == name).to_numpy()
            color = "#cccccc" if name == "(missing)" else cmap(i % cmap.N)
            handles.append(ax.scatter(umap["x"][m], umap["y"][m], s=point, color=color, linewidths=0))
        if len(names) <= 20:  # names given explicitly: a name starting with "_" would be dropped otherwise
            ax.legend(handles, names, fontsize=7, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(f"{method}: coloured by {column.replace('_', ' ')}")
    ax.set_xticks([])
    ax.set_yticks([])
    return _png(fig)


# --------------------------------------------------------------------------- tables


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return '<td class="muted">–</td>'
    if isinstance(value, (float, np.floating)):
        return f"<td>{float(value):.4g}</td>"
    if isinstance(value, (int, np.integer)):
        return f"<td>{int(value)}</td>"
    return f'<td class="s">{html.escape(str(value))}</td>'


def _table(df: pd.DataFrame | None, highlight: np.ndarray | None = None) -> str:
    if df is None or df.empty:
        return '<p class="muted">No rows.</p>'
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for i, values in enumerate(df.itertuples(index=False)):
        cls = ' class="flag"' if highlight is not None and highlight[i] else ""
        rows.append(f"<tr{cls}>{''.join(_cell(v) for v in values)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _flag_list(fl: pd.DataFrame | None) -> str:
    if fl is None or fl.empty:
        return '<p class="ok">No version crossed a flag threshold.</p>'
    items = []
    order = fl.assign(_whole=fl["cell_type"].isna()).sort_values(
        ["version", "scope", "_whole", "measure", "cell_type"], ascending=[True, True, False, True, True]
    )
    for r in order.drop(columns="_whole").itertuples(index=False):
        what, op = _FLAG_TEXT.get(r.measure, (r.measure, "vs"))
        scope = "vs version 1" if r.scope == "vs_first" else "vs previous version"
        where = "all cells" if r.cell_type is None or pd.isna(r.cell_type) else f"cell type {r.cell_type}"
        items.append(
            f"<li>Version {int(r.version)}, {html.escape(where)} ({scope}): {html.escape(what)} "
            f"<b>{float(r.value):.4g}</b> {html.escape(op)} threshold {float(r.threshold):.4g}</li>"
        )
    return f'<ul class="flaglist">{"".join(items)}</ul>'


def _flagged_rows(cd: pd.DataFrame, fl: pd.DataFrame | None) -> np.ndarray:
    if fl is None or fl.empty or cd.empty:
        return np.zeros(len(cd), dtype=bool)
    typed = fl[fl["cell_type"].notna()]
    keys = set(zip(typed["version"].astype(int), typed["scope"], typed["cell_type"].astype(str)))
    return np.array([(int(v), s, str(c)) in keys for v, s, c in zip(cd["version"], cd["scope"], cd["cell_type"])])


def _section(title: str, body: str) -> str:
    return f"<h2>{html.escape(title)}</h2>\n{body}\n"


def _figs(images: list[tuple[str, bytes]]) -> str:
    return '<div class="figs">' + "".join(_img(data, alt) for alt, data in images) + "</div>"


@plain_text
def render_report(
    path: str | Path,
    tables_by_name: dict[str, pd.DataFrame],
    umap: pd.DataFrame | None,
    transfer_figures: dict[str, bytes] | None,
    title: str,
    umap_method: str | None = None,
) -> Path:
    """Write the drift audit report to ``path`` (one HTML file) and return the path.

    ``tables_by_name`` uses the DriftStore table names (``versions``, ``version_drift``,
    ``celltype_drift``, ``batch_drift``, ``drift_flags``, ``transfer_summary``); missing ones
    are left out. ``umap`` has columns x, y, version_added, batch, label, displacement;
    ``umap_method`` (else ``umap.attrs["method"]``, else "UMAP") names the projection.
    ``transfer_figures`` maps a caption to PNG bytes.
    """
    get = lambda name: tables_by_name.get(name)  # noqa: E731
    versions, vd, cd = get("versions"), get("version_drift"), get("celltype_drift")
    bd, fl, ts = get("batch_drift"), get("drift_flags"), get("transfer_summary")
    parts = [f"<h1>{html.escape(title)}</h1>"]

    parts.append(_section("Version history", _table(versions)))
    parts.append(_section("Flags", _flag_list(fl)))
    if vd is not None and not vd.empty:
        body = _figs(_line_figures(vd, bd)) + _table(vd.sort_values(["version", "scope"]))
        parts.append(_section("Drift measures over versions", body))
    if cd is not None and not cd.empty:
        cd = cd.sort_values(["version", "scope", "cell_type"]).reset_index(drop=True)
        heat = _heatmap(cd)
        body = (_figs([("cell type heatmap", heat)]) if heat else "") + _table(cd, _flagged_rows(cd, fl))
        parts.append(_section("Per cell type (flagged rows highlighted)", body))
    if bd is not None and not bd.empty:
        parts.append(_section("Per batch", _table(bd.sort_values(["version", "batch"]))))
    if umap is not None and not umap.empty:
        missing = {"x", "y"} - set(umap.columns)
        if missing:
            raise InputError(f"umap frame lacks column(s) {sorted(missing)}")
        method = umap_method or umap.attrs.get("method", "UMAP")
        columns = [c for c in ("version_added", "batch", "label", "displacement") if c in umap.columns]
        images = [(f"{method} coloured by {c}", _scatter(umap, c, method)) for c in columns]
        parts.append(_section(f"Embedding ({method})", _figs(images)))
    if ts is not None and not ts.empty:
        parts.append(_section("Label transfer summary", _table(ts)))
    if transfer_figures:
        body = "".join(
            f"<figure>{_img(data, name)}<figcaption>{html.escape(name)}</figcaption></figure>"
            for name, data in transfer_figures.items()
        )
        parts.append(_section("Label transfer per query", body))

    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write the report to {path}: {exc.strerror or exc}") from exc
    return path
