"""Results as AnnData, the way scanpy reads them: metadata and predictions in ``obs``, the embedding in ``obsm``.

The embedding goes to ``obsm["X_atlasengine"]`` (scanpy's ``X_<name>`` convention, so
``sc.pp.neighbors(adata, use_rep="X_atlasengine")`` works); ``uns["atlasengine"]`` says which
atlas and version the numbers come from.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from atlasengine.api.inputs import PREFIX
from atlasengine.api.selection import CellSelection, select_cells
from atlasengine.api.sources import SomaInput, as_input
from atlasengine.errors import InputError
from atlasengine.store.version import VersionReader
from atlasengine.version import __version__

EMBEDDING = "X_atlasengine"


def _provenance(path: str, version: int, embedding: bool = True) -> dict:
    where = {"embedding": EMBEDDING} if embedding else {}
    return {"atlas": path, "version": int(version), "engine_version": __version__, **where}


def query_anndata(adata: ad.AnnData | SomaInput, predictions: pd.DataFrame, latent: np.ndarray | None, path: str,
                  version: int) -> ad.AnnData:
    """Return a copy of the folded-in ``adata`` with its predictions in ``obs`` and its embedding in ``obsm``.

    ``latent`` None (predictions of cells not folded in): no embedding.

    ``predictions`` and ``latent`` rows follow ``predictions.index`` (cell names); they are put
    in ``adata``'s order. The input's own obs columns of the same names are kept as ``user_<name>``
    (as the atlas keeps them), and an ``obsm["X_atlasengine"]`` it brings (an earlier export) as
    ``obsm["user_X_atlasengine"]`` (the prefix again where that is taken). A ``/`` in a column name (``p_<label>`` of a type such as "T/NK")
    becomes ``_``, which h5ad files can hold (:func:`h5ad_names`). A streamed input
    (backed AnnData, :class:`SomaInput`) comes back with its obs and var only, without ``X``
    (its counts are in the atlas: ``Atlas.to_anndata(counts=True, cells=...)``).
    """
    source = as_input(adata)
    out = ad.AnnData(obs=source.obs.copy(), var=source.var.copy()) if source.streamed else adata.copy()
    names = pd.Index([str(c) for c in out.obs_names])
    rows = pd.Index(predictions.index).get_indexer(names)
    if (rows < 0).any():
        raise InputError(f"{int((rows < 0).sum())} cells of the AnnData have no prediction")
    columns = h5ad_names(predictions.columns)
    out.obs = keep_aside(out.obs, list(columns.values()))
    for col, name in columns.items():
        out.obs[name] = predictions[col].to_numpy()[rows]
    if EMBEDDING in out.obsm:  # another atlas's (or version's) embedding: kept aside, never taken for this one's
        aside = PREFIX + EMBEDDING
        while aside in out.obsm:  # one kept aside before: the prefix again, as obs columns get it
            aside = PREFIX + aside
        out.obsm[aside] = out.obsm.pop(EMBEDDING)
    if latent is not None:
        out.obsm[EMBEDDING] = np.asarray(latent)[rows]
    out.uns["atlasengine"] = _provenance(path, version, embedding=latent is not None)
    return out


def h5ad_names(columns: Sequence[str]) -> dict[str, str]:
    """Map prediction columns to names an h5ad file can hold: ``/`` (a cell type "T/NK" in ``p_T/NK``) becomes ``_``.

    >>> h5ad_names(["label", "p_T/NK", "p_T_NK"])
    {'label': 'label', 'p_T/NK': 'p_T_NK_', 'p_T_NK': 'p_T_NK'}
    """
    out, taken = {}, {str(c) for c in columns if "/" not in str(c)}
    for col in columns:
        name = str(col)
        if "/" in name:
            name = name.replace("/", "_")
            while name in taken:
                name += "_"
            taken.add(name)
        out[col] = name
    return out


def keep_aside(obs: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Return ``obs`` with its columns named in ``names`` kept as ``user_<name>`` (:data:`PREFIX`; again while taken)."""
    taken = set(map(str, obs.columns)) | set(names)
    renamed = {}
    for col in obs.columns:
        if col in names:
            new = PREFIX + col
            while new in taken:
                new = PREFIX + new
            renamed[col] = new
            taken.add(new)
    return obs.rename(columns=renamed)


def atlas_anndata(reader: VersionReader, counts: bool = False, cells: CellSelection | None = None) -> ad.AnnData:
    """Return the atlas at ``reader``'s version as an AnnData: every cell (or ``cells``) with its metadata.

    ``obs``: what :meth:`VersionReader.obs` holds (dataset, batch, label, version_added and the
    predictions of the version that added each cell); ``var``: the genes with the reference's
    own gene columns (e.g. ``gene_symbol``); ``obsm["X_atlasengine"]``: the embedding
    under this version's model; ``X``: raw counts read from the cell store when ``counts``,
    else none. ``cells``: cell names (in the order given), or a boolean mask over
    :meth:`VersionReader.obs` rows (a pandas Series read by its cell names: :func:`select_cells`).
    """
    obs = reader.obs()
    rows = np.arange(len(obs)) if cells is None else select_cells(obs, cells, reader.number, ordered=True)
    x = reader.counts(rows) if counts else None  # only the cells asked for are read
    genes = reader.gene_annotations().reindex(pd.Index(reader.genes(), name="gene"))  # the reference's gene columns
    out = ad.AnnData(X=x, obs=_plain(obs.iloc[rows]), var=_plain(genes))
    out.obsm[EMBEDDING] = reader.latent()[rows]
    out.uns["atlasengine"] = _provenance(reader.store.source, reader.number)
    return out


def _plain(obs: pd.DataFrame) -> pd.DataFrame:
    """Obs columns h5ad can write: object columns of text (None kept as missing) become strings or categories."""
    out = obs.copy()
    for col in out.columns:
        if out[col].dtype == object:
            values = out[col]
            given = values[values.notna()]
            if len(given) and given.map(lambda v: isinstance(v, (bool, np.bool_))).all():
                out[col] = values.astype("boolean")
            else:
                out[col] = pd.Categorical(values.where(values.notna(), None))
    return out
