"""Where a dataset's cells come from: an AnnData in memory, a backed AnnData, or a TileDB-SOMA experiment.

An in-memory AnnData is used as it is. A backed AnnData (``anndata.read_h5ad(path,
backed="r")``) and a SOMA experiment (:class:`SomaInput`) are *streamed*: their metadata is
read whole (a few columns per cell), their counts in parts of ``chunk_cells`` rows, so a
dataset larger than memory can go into the atlas. Every source looks the same to the rest of
the engine (:class:`InputData`): ``obs`` and ``var`` frames indexed by cell and gene names, and
:meth:`InputData.count_parts` yielding CSR row parts in the ``obs`` order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasengine.errors import InputError

log = logging.getLogger("atlasengine")

CHUNK_CELLS = 20_000
"""Rows per part of a streamed input (about 10M non-zeros at 500 per cell: ~80 MB as CSR)."""


@dataclass(frozen=True)
class SomaInput:
    """The cells of a TileDB-SOMA experiment (a CELLxGENE-Census-shaped one, or one ``tiledbsoma.io`` wrote).

    Parameters
    ----------
    uri
        The experiment (a folder, or any URI TileDB opens, e.g. ``s3://...``).
    obs_filter
        A SOMA value filter selecting cells (e.g. ``"tissue == 'lung' and is_primary_data == True"``);
        default: every cell.
    measurement
        The measurement holding the counts.
    layer
        The X layer of raw counts; default: the measurement's only layer (``raw`` in the Census).
    obs_name_column
        The obs column of cell names; default ``obs_id`` when present, else the SOMA joinid as text.
    var_name_column
        The var column of gene names; default the first of ``var_id``, ``feature_id`` present.
    chunk_cells
        Cells read at a time.

    Examples
    --------
    >>> SomaInput("census/homo_sapiens", obs_filter="tissue_general == 'lung'").obs_filter
    "tissue_general == 'lung'"
    """

    uri: str
    obs_filter: str | None = None
    measurement: str = "RNA"
    layer: str | None = None
    obs_name_column: str | None = None
    var_name_column: str | None = None
    chunk_cells: int = CHUNK_CELLS


@dataclass
class InputData:
    """A dataset as the engine reads it: metadata in memory, counts in row parts.

    ``streamed`` is False for an in-memory AnnData (one part: its matrix) and True otherwise.
    """

    obs: pd.DataFrame
    var: pd.DataFrame
    streamed: bool
    _parts: Callable[[str | None], Iterator[sp.spmatrix | np.ndarray]]
    where: str
    """How messages name the counts (``adata.X``, ``the SOMA experiment ...``)."""
    layers: tuple[str, ...] = ()
    soma: bool = False
    """Whether the cells come from a SOMA experiment (its X layer is chosen in :class:`SomaInput`)."""

    @property
    def n_obs(self) -> int:
        """Number of cells."""
        return len(self.obs)

    @property
    def n_vars(self) -> int:
        """Number of genes."""
        return len(self.var)

    @property
    def obs_names(self) -> pd.Index:
        """Cell names."""
        return self.obs.index

    @property
    def var_names(self) -> pd.Index:
        """Gene names."""
        return self.var.index

    def count_parts(self, layer: str | None) -> Iterator[sp.spmatrix | np.ndarray]:
        """Yield the counts (``X`` or ``layer``) in consecutive row parts, in ``obs`` order."""
        return self._parts(layer)


def is_streamed(data: object) -> bool:
    """Whether ``data`` is read in parts (a backed AnnData or a :class:`SomaInput`), without reading it."""
    if isinstance(data, InputData):
        return data.streamed
    return isinstance(data, SomaInput) or (isinstance(data, ad.AnnData) and data.isbacked)


def as_input(data: ad.AnnData | SomaInput | InputData, chunk_cells: int = CHUNK_CELLS) -> InputData:
    """Return ``data`` (an AnnData, backed or not, or a :class:`SomaInput`) as :class:`InputData`.

    Raises :class:`InputError` for anything else, or a SOMA experiment that cannot be read.
    """
    if isinstance(data, InputData):
        return data
    if isinstance(data, SomaInput):
        return _soma_input(data)
    if not isinstance(data, ad.AnnData):
        raise InputError(f"expected an AnnData (in memory or backed) or a SomaInput, got {type(data).__name__}")
    if data.isbacked:
        return _backed_input(data, chunk_cells)
    layers = tuple(data.layers.keys())

    def whole(layer: str | None) -> Iterator[sp.spmatrix | np.ndarray]:
        yield data.X if layer is None else data.layers[layer]

    return InputData(data.obs, data.var, False, whole, "adata.X", layers)


def _backed_input(adata: ad.AnnData, chunk_cells: int) -> InputData:
    """Read a backed AnnData: ``X`` from its file ``chunk_cells`` rows at a time (layers as anndata holds them)."""
    n = adata.n_obs

    def parts(layer: str | None) -> Iterator[sp.spmatrix | np.ndarray]:
        matrix = adata.X if layer is None else adata.layers[layer]
        if matrix is None:
            return
        for s in range(0, n, chunk_cells):
            yield matrix[s : min(s + chunk_cells, n)]

    return InputData(adata.obs, adata.var, True, parts, f"adata.X of {adata.filename}", tuple(adata.layers.keys()))


def _soma_input(source: SomaInput) -> InputData:
    """Read a SOMA experiment: obs and var whole (as the filter selects), X in parts of ``chunk_cells`` cells."""
    import tiledbsoma

    if source.chunk_cells < 1:
        raise InputError(f"chunk_cells must be at least 1, got {source.chunk_cells}")
    try:
        exp = tiledbsoma.Experiment.open(source.uri)
    except (tiledbsoma.DoesNotExistError, tiledbsoma.SOMAError) as exc:
        raise InputError(f"cannot open {source.uri!r} as a TileDB-SOMA experiment: {exc}") from exc
    with exp:
        if source.measurement not in exp.ms:
            raise InputError(f"the SOMA experiment {source.uri!r} has no measurement {source.measurement!r} "
                             f"(it has {sorted(exp.ms.keys())})")
        ms = exp.ms[source.measurement]
        layers = sorted(ms.X.keys()) if "X" in ms else []
        layer = source.layer
        if layer is None:
            if len(layers) != 1:
                raise InputError(f"the SOMA experiment {source.uri!r} has X layers {layers}: name the one with raw "
                                 "counts (SomaInput(..., layer=...))")
            layer = layers[0]
        elif layer not in layers:
            raise InputError(f"the SOMA experiment {source.uri!r} has no X layer {layer!r} (it has {layers})")
        try:
            obs = exp.obs.read(value_filter=source.obs_filter).concat().to_pandas()
        except (tiledbsoma.SOMAError, ValueError) as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # TileDB appends its C++ call stack
            raise InputError(f"the obs filter {source.obs_filter!r} cannot be applied to {source.uri!r}: {why}") from exc
        var = ms.var.read().concat().to_pandas()
    if obs.empty:
        raise InputError(f"no cells of {source.uri!r} pass the obs filter {source.obs_filter!r}")
    obs = obs.sort_values("soma_joinid", kind="stable")
    obs_ids = obs.pop("soma_joinid").to_numpy(np.int64)
    obs.index = _names(obs, source.obs_name_column, ("obs_id",), obs_ids, "obs", source.uri)
    var_ids = var.pop("soma_joinid").to_numpy(np.int64)
    var.index = _names(var, source.var_name_column, ("var_id", "feature_id"), None, "var", source.uri)
    n_genes = len(var_ids)
    var_pos = np.full(int(var_ids.max()) + 1 if n_genes else 0, -1, dtype=np.int64)
    var_pos[var_ids] = np.arange(n_genes)

    def parts(_layer: str | None) -> Iterator[sp.csr_matrix]:
        with tiledbsoma.Experiment.open(source.uri) as exp:
            X = exp.ms[source.measurement].X[layer]
            for s in range(0, len(obs_ids), source.chunk_cells):
                ids = obs_ids[s : s + source.chunk_cells]
                coords = slice(int(ids[0]), int(ids[-1])) if ids[-1] - ids[0] == len(ids) - 1 else ids
                tbl = X.read(coords=(coords,)).tables().concat()
                rows = np.searchsorted(ids, tbl.column("soma_dim_0").to_numpy())
                cols = var_pos[tbl.column("soma_dim_1").to_numpy()]
                yield sp.csr_matrix((tbl.column("soma_data").to_numpy(), (rows, cols)), shape=(len(ids), n_genes))

    return InputData(obs, var, True, parts, f"X layer {layer!r} of the SOMA experiment {source.uri!r}", soma=True)


def _names(frame: pd.DataFrame, column: str | None, defaults: tuple[str, ...], joinids: np.ndarray | None,
           axis: str, uri: str) -> pd.Index:
    """Return the cell or gene names of a SOMA dataframe: ``column``, else the first default present, else the joinids."""
    if column is not None:
        if column not in frame.columns:
            raise InputError(f"the {axis} of {uri!r} has no column {column!r} (columns: {list(frame.columns)[:12]})")
        chosen = column
    else:
        chosen = next((c for c in defaults if c in frame.columns), None)
    if chosen is None:
        if joinids is None:
            raise InputError(f"the {axis} of {uri!r} has none of the columns {list(defaults)} to name genes by: "
                             f"pass var_name_column= (columns: {list(frame.columns)[:12]})")
        log.info("%s of %s has no %s column: cells are named by their soma_joinid", axis, uri, defaults[0])
        return pd.Index(joinids.astype(str), name="cell")
    names = frame.pop(chosen).astype(str)
    return pd.Index(names.to_numpy(), name=chosen)
