"""Checking and preparing a user's AnnData before anything is written.

Every problem raises :class:`~atlasengine.errors.InputError` naming what is wrong, before the
atlas is touched.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from atlasengine.api.sources import InputData, SomaInput, as_input
from atlasengine.errors import InputError
from atlasengine.store.cells import OBS_COLUMNS
from atlasengine.store.metadata import ARROW_TYPES
from atlasengine.store.version import PREDICTION_COLUMNS
from atlasengine.transfer import UNKNOWN

log = logging.getLogger("atlasengine")


@dataclass
class Metadata:
    """The user's own obs columns of a dataset, as the cell store will hold them."""

    table: pa.Table
    """One column per obs column (stored names), rows in the AnnData's order."""
    columns: dict[str, str]
    """Stored name -> kind (text, int, float, bool), in the AnnData's column order."""
    renamed: dict[str, str]
    """The user's name -> stored name, for names the engine uses itself (kept under ``user_``)."""


@dataclass
class PreparedInput:
    """Counts aligned to the atlas genes plus the cells' atlas metadata."""

    counts: sp.csr_matrix | None
    """The aligned counts in memory; None for a streamed input (see :attr:`parts`)."""
    obs: pd.DataFrame  # columns: obs_id, dataset, batch, label
    batches: list[str]
    genes_matched: int
    genes_padded: int
    genes_dropped: int
    metadata: Metadata | None = None
    gene_annotations: pa.Table | None = None
    """The reference's own gene columns (create only; :func:`prepare_gene_columns`)."""
    parts: Callable[[], Iterator[sp.csr_matrix]] | None = None
    """A streamed input's aligned, checked counts, read again from its source in row parts."""
    counts_checksums: np.ndarray | None = None
    """Each cell's counts checksum, set when the cells are written."""

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return len(self.obs)

    @property
    def streamed(self) -> bool:
        """Whether the counts stay in their source (read in parts) instead of memory."""
        return self.counts is None

    def count_parts(self) -> Iterator[sp.csr_matrix]:
        """Yield the aligned counts in consecutive row parts (the whole matrix when it is in memory)."""
        if self.counts is not None:
            yield self.counts
        else:
            yield from self.parts()


def _examples(values: Collection, n: int = 5) -> str:
    vals = list(values)
    shown = ", ".join(repr(v) for v in vals[:n])
    return shown + (f" (and {len(vals) - n} more)" if len(vals) > n else "")


def _column(adata: ad.AnnData | InputData, key: str, role: str) -> pd.Series:
    if not isinstance(key, str) or not key:
        raise InputError(f"{role} must be the name of an obs column, got {key!r}")
    if key not in adata.obs.columns:
        raise InputError(
            f"{role} column {key!r} is not in adata.obs (columns: {_examples(adata.obs.columns, 12)})"
        )
    return adata.obs[key]


MAX_NAME_LENGTH = 1000
"""The longest label, batch or dataset name accepted (longer ones broke figures and memory)."""
MISSING_TEXT = frozenset({"", "nan", "none", "null", "<na>", "na"})
"""Texts that stand for a missing value (``.astype(str)`` turns NaN into "nan", None into "None")."""


def _is_missing(value: object) -> bool:
    if value is None or value is pd.NA or (isinstance(value, float) and not np.isfinite(value)):
        return True
    return isinstance(value, str) and value.strip().lower() in MISSING_TEXT


def _as_names(values: pd.Series, role: str, allow_missing: bool) -> list[str | None]:
    """Return an obs column's values as plain text; missing ones (also "nan", "None", "") are refused or None."""
    raw = values.tolist()
    out: list[str | None] = [None if _is_missing(v) else str(v) for v in raw]
    missing = [v for v, o in zip(raw, out) if o is None]
    if missing:
        texts = sorted({repr(v) for v in missing if isinstance(v, str)})
        said = f" ({', '.join(texts[:5])} count as missing)" if texts else ""
        if not allow_missing:
            raise InputError(f"{role} has {len(missing)} missing or empty value(s){said}; every cell needs one")
        if texts:
            log.warning("%s: %d value(s) treated as missing%s", role, len(missing), said)
    long = sorted({v for v in out if v is not None and len(v) > MAX_NAME_LENGTH})
    if long:
        raise InputError(f"{role} has values longer than {MAX_NAME_LENGTH} characters: "
                         f"{_examples([v[:40] + '...' for v in long])}; shorten them")
    return out


def _reads_as_unknown(label: str) -> bool:
    """Whether ``label`` reads as the Unknown call ("Unknown", "unknown", " UNKNOWN ")."""
    return label.strip().casefold() == UNKNOWN.casefold()


def _refuse_reserved_labels(labels: list[str | None], role: str) -> None:
    """Refuse a cell type named like the Unknown call (it could not be told from it), saying how to fix it."""
    hits = [v for v in labels if v is not None and _reads_as_unknown(v)]
    if hits:
        raise InputError(
            f"{role} names {len(hits)} cell(s) {_examples(sorted(set(hits)))}, which reads as {UNKNOWN!r}, the label the engine gives "
            "cells it calls Unknown; "
            f"rename that type (e.g. 'unknown_type') or, if those cells are unannotated, set them to None"
        )


def check_label_name(label: object, role: str = "the new label") -> str:
    """Return ``label`` if it can name a cell type: text, not missing ("nan", "None", blank), short, not "Unknown".

    >>> check_label_name("ductal")
    'ductal'
    """
    if not isinstance(label, str):
        raise InputError(f"{role} must be a text, got {type(label).__name__} {str(label)[:60]!r}")
    if _is_missing(label):
        raise InputError(f"{role} {label!r} is empty or reads as a missing value; give the type a name")
    _as_names(pd.Series([label], dtype=object), role, allow_missing=False)  # its length
    if _reads_as_unknown(label):
        raise InputError(f"{role} cannot be {UNKNOWN!r} ({label!r} reads as it): it is the label the engine gives "
                         "cells it calls Unknown, and cells named so could not be told from that call; choose another "
                         "name")
    return label


def _refuse_empty_cells(counts: sp.csr_matrix, cells: Sequence[str], where: str, offset: int = 0) -> None:
    """Refuse cells with no counts at all: there is nothing to embed, yet they would get a confident label.

    ``counts`` holds the rows of ``cells[offset:]`` (a part of a streamed input).
    """
    empty = np.flatnonzero(np.diff(counts.indptr) == 0)
    if len(empty):
        raise InputError(
            f"{len(empty)} cell(s) have no counts {where} (e.g. {_examples([cells[offset + i] for i in empty[:5]])}); "
            "remove them first (e.g. scanpy.pp.filter_cells(adata, min_counts=1))"
        )


def _counts_where(source: InputData, layer: str | None) -> str:
    """How messages name the counts; refuses a layer the input does not have."""
    if layer is None:
        return source.where
    if source.soma:
        raise InputError(f"layer={layer!r} names an AnnData layer; a SomaInput's X layer is SomaInput(layer=...)")
    if layer not in source.layers:
        raise InputError(f"layer {layer!r} is not in adata.layers (layers: {_examples(source.layers)})")
    return f"adata.layers[{layer!r}]"


def count_matrix(adata: ad.AnnData | InputData, layer: str | None) -> sp.csr_matrix:
    """Return the raw counts (``X`` or ``layers[layer]``) as float32 CSR, checked to be counts."""
    source = as_input(adata)
    where = _counts_where(source, layer)
    try:
        parts = [_as_counts(part, where) for part in source.count_parts(layer)]
    except InputError as exc:
        if layer is None and getattr(adata, "raw", None) is not None:  # scanpy keeps the counts there
            raise InputError(f"{exc}. adata.raw is not read: put its counts in a layer, "
                             "adata.layers['counts'] = adata.raw[:, adata.var_names].X, and pass layer='counts'") from exc
        raise
    if not parts:
        raise InputError(f"{where} is empty (None); raw counts are needed")
    return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")


def _as_counts(X: object, where: str) -> sp.csr_matrix:
    """One matrix (or a part of one) as float32 CSR in canonical form, checked to be counts."""
    if X is None:
        raise InputError(f"{where} is empty (None); raw counts are needed")
    try:
        m = sp.csr_matrix(X)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where} cannot be read as a numeric matrix: {exc}") from exc
    if not (np.issubdtype(m.dtype, np.number) or m.dtype == bool):
        raise InputError(f"{where} has dtype {m.dtype}; raw counts must be numeric")
    _check_counts(m.data, where)
    m = m.astype(np.float32, copy=False)
    if not m.has_canonical_format or not m.data.all():
        m = m.copy()  # m may share its arrays with the caller's matrix, which is never changed
        m.sum_duplicates()
        m.eliminate_zeros()
    return m


CHECK_CHUNK = 1 << 22


def _check_counts(values: np.ndarray, where: str) -> None:
    """Refuse non-finite, negative, non-integer or too large values (in parts: bounded memory)."""
    bad = {"nonfinite": 0, "negative": 0, "fraction": 0}
    example, top = None, 0.0
    for s in range(0, values.size, CHECK_CHUNK):
        part = values[s : s + CHECK_CHUNK].astype(np.float64, copy=False)
        finite = np.isfinite(part)
        bad["nonfinite"] += int((~finite).sum())
        part = part[finite]
        bad["negative"] += int((part < 0).sum())
        frac = part != np.round(part)
        bad["fraction"] += int(frac.sum())
        if example is None and frac.any():
            example = float(part[frac][0])
        if part.size:
            top = max(top, float(part.max()))
    if bad["nonfinite"]:
        raise InputError(f"{where} contains {bad['nonfinite']} NaN or infinite value(s); raw counts are needed")
    if bad["negative"]:
        raise InputError(f"{where} contains {bad['negative']} negative value(s); raw counts are needed")
    if bad["fraction"]:
        raise InputError(
            f"{where} contains {bad['fraction']} non-integer value(s) (e.g. {example:.4g}): it looks normalised "
            "or log-transformed; pass raw counts (or the layer that holds them with layer=)"
        )
    if top > 2**24:
        raise InputError(f"{where} holds counts above 2^24 ({top:.0f}), which float32 cannot hold exactly")


def check_names(adata: ad.AnnData | InputData) -> tuple[list[str], list[str]]:
    """Cell and gene names as strings, refusing empty data and empty or duplicated names."""
    if not isinstance(adata, (ad.AnnData, InputData)):
        raise InputError(f"expected an AnnData, got {type(adata).__name__}")
    if adata.n_obs == 0:
        raise InputError("the AnnData has no cells (0 observations)")
    if adata.n_vars == 0:
        raise InputError("the AnnData has no genes (0 variables)")
    cells = [str(c) for c in adata.obs_names]
    genes = [str(g) for g in adata.var_names]
    for what, names in (("cell", cells), ("gene", genes)):
        empty = sum(1 for n in names if not n.strip())
        if empty:
            raise InputError(f"{empty} {what} name(s) are empty")
        dup = pd.Index(names)[pd.Index(names).duplicated()].unique()
        if len(dup):
            fix = "obs_names_make_unique()" if what == "cell" else "var_names_make_unique()"
            raise InputError(f"duplicate {what} names: {_examples(dup)}; make them unique (e.g. {fix})")
        unwritable = [n for n in names if not _utf8(n)]
        if unwritable:  # lone surrogates, e.g. bytes decoded with errors="surrogateescape"
            raise InputError(f"{len(unwritable)} {what} name(s) are not valid Unicode text (e.g. "
                             f"{unwritable[0].encode('utf-8', 'backslashreplace').decode()!r}); the atlas stores "
                             "names as UTF-8: fix their encoding")
    return cells, genes


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def gene_spelling(name: str) -> str:
    """Return a gene name without letter case and an Ensembl version suffix ('ENSG00000141510.16' -> 'ensg00000141510')."""
    return re.sub(r"\.\d+$", "", name).lower()


def _warn_of_absent_genes(genes: Sequence[str], atlas_genes: Sequence[str], present: np.ndarray) -> None:
    """Warn that atlas genes missing from the data are taken as zero counts; name those spelled otherwise there.

    Another spelling is another letter case or an Ensembl version suffix (``.2``).
    """
    absent = [a for a, p in zip(atlas_genes, present) if not p]
    if not absent:
        return
    by_spelling = {gene_spelling(g): g for g in genes}
    differ = [(a, by_spelling[gene_spelling(a)]) for a in absent if gene_spelling(a) in by_spelling]
    said = ""
    if differ:
        said = (f"; {len(differ)} of them are in the data spelled otherwise (letter case or a version suffix, e.g. "
                + ", ".join(f"{data!r} for {atlas!r}" for atlas, data in differ[:3])
                + "): rename them to the atlas's spelling if they are the same genes")
    log.warning("%d of the atlas's %d genes (%.0f%%) are not in the data and count as zero counts (e.g. %s)%s",
                len(absent), len(atlas_genes), 100 * len(absent) / len(atlas_genes), _examples(absent), said)


@dataclass(frozen=True)
class GeneAlignment:
    """How a dataset's genes map onto the atlas's: a selection matrix (data genes x atlas genes) and its counts."""

    select: sp.csr_matrix | None  # None: the data's genes are the atlas's, in order
    matched: int
    padded: int
    dropped: int

    def apply(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        """Reorder ``counts``' columns to the atlas genes (absent genes zero)."""
        return counts if self.select is None else sp.csr_matrix(counts @ self.select, dtype=np.float32)


def gene_alignment(genes: Sequence[str], atlas_genes: Sequence[str] | None, min_overlap: float) -> GeneAlignment:
    """Map ``genes`` onto ``atlas_genes`` (None: a new atlas, taken as they are).

    Refuses when fewer than ``min_overlap`` of the atlas genes are present.
    """
    if atlas_genes is None:
        return GeneAlignment(None, len(genes), 0, 0)
    pos = pd.Index(genes).get_indexer(list(atlas_genes))
    present = pos >= 0
    share = present.mean() if len(atlas_genes) else 0.0
    if share < min_overlap:
        missing = [g for g, p in zip(atlas_genes, present) if not p]
        raise InputError(
            f"only {present.sum()} of the atlas's {len(atlas_genes)} genes ({share:.0%}) are in the data, "
            f"below the required {min_overlap:.0%}; missing e.g. {_examples(missing)}. Are the gene names "
            "of the same kind (symbols vs Ensembl ids, Ensembl ids with or without version suffixes)?"
        )
    _warn_of_absent_genes(genes, atlas_genes, present)
    cols = np.flatnonzero(present)
    select = sp.csr_matrix(
        (np.ones(len(cols), dtype=np.float32), (pos[present], cols)), shape=(len(genes), len(atlas_genes))
    )
    return GeneAlignment(select, int(present.sum()), int((~present).sum()), len(genes) - int(present.sum()))


def prepare_input(
    adata: ad.AnnData | SomaInput | InputData,
    *,
    batch_key: str,
    label_key: str | None,
    layer: str | None,
    dataset: str,
    atlas_genes: Sequence[str] | None,
    min_gene_overlap: float,
    existing_batches: Collection[str] = (),
    new_batches_only: bool = True,
    stream: bool = True,
) -> PreparedInput:
    """Validate ``adata`` and return what the store and the model need.

    A backed AnnData or a :class:`~atlasengine.api.sources.SomaInput` is read in parts twice:
    once here, to check every value before anything is written, and again when the cells are
    written (:meth:`PreparedInput.count_parts`); its counts are never whole in memory. With
    ``stream=False`` they are gathered into memory (a query to embed, not to store).
    """
    source = as_input(adata)
    cells, genes = check_names(source)
    batch = _as_names(_column(source, batch_key, "batch_key"), f"batch column {batch_key!r}", allow_missing=False)
    labels: list[str | None] = [None] * len(cells)
    if label_key is not None:
        labels = _as_names(_column(source, label_key, "label_key"), f"label column {label_key!r}", allow_missing=True)
        if all(v is None for v in labels):
            raise InputError(f"label column {label_key!r} holds no labels at all")
        _refuse_reserved_labels(labels, f"label column {label_key!r}")
    if not isinstance(dataset, str) or _is_missing(dataset) or len(dataset) > MAX_NAME_LENGTH:
        raise InputError(f"dataset name must be a text of 1 to {MAX_NAME_LENGTH} characters, got {str(dataset)[:60]!r}")
    where = _counts_where(source, layer)
    alignment = gene_alignment(genes, atlas_genes, min_gene_overlap)
    empty_where = "in the atlas's genes" if atlas_genes is not None else "at all"

    def aligned_parts() -> Iterator[sp.csr_matrix]:
        offset = 0
        for raw in source.count_parts(layer):
            part = alignment.apply(_as_counts(raw, where))
            if part.shape[1] != (len(atlas_genes) if atlas_genes is not None else len(genes)):
                raise InputError(f"{where} has {part.shape[1]} columns for {len(genes)} genes")
            _refuse_empty_cells(part, cells, empty_where, offset)
            offset += part.shape[0]
            yield part
        if offset != len(cells):
            raise InputError(f"{where} holds {offset} rows for {len(cells)} cells")

    batches = list(dict.fromkeys(batch))
    if new_batches_only:
        clash = [b for b in batches if b in set(existing_batches)]
        if clash:
            raise InputError(
                f"batch name(s) already in the atlas: {_examples(clash)}; a folded-in dataset brings new batches "
                "(rename them, e.g. prefix with the dataset name)"
            )
    if source.streamed and stream:
        n_parts = sum(1 for _ in aligned_parts())  # the checking pass: nothing is kept
        log.debug("%s checked in %d part(s)", where, n_parts)
        counts = None
    else:
        parts = list(aligned_parts())
        counts = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
    obs = pd.DataFrame({"obs_id": cells, "dataset": dataset, "batch": batch, "label": labels})
    return PreparedInput(counts, obs, batches, alignment.matched, alignment.padded, alignment.dropped,
                         parts=aligned_parts)


# ----------------------------------------------------------------------------- own obs columns
ENGINE_COLUMNS = frozenset({"soma_joinid", "cell", *OBS_COLUMNS, *PREDICTION_COLUMNS})
"""Names of the engine's own columns in ``obs()``, ``to_anndata()`` and the ``cells`` SQL view."""
PREFIX = "user_"
"""A user's obs column named like an engine column (letter case aside) is kept as ``user_<name>``."""


def _reserved(name: str) -> bool:
    low = name.lower()
    return low in ENGINE_COLUMNS or low.startswith(FOREIGN_PREFIXES)


FOREIGN_PREFIXES = ("soma_", "__")
"""Name starts the cell store reserves (``soma_`` is SOMA's, ``__`` TileDB's, e.g. pandas' ``__index_level_0__``):
columns so named are kept as ``user_<name>``."""


def _dtype_kind(dtype: object) -> str:
    """Return the kind a column of ``dtype`` stores when none of its values says (every one missing).

    Only pandas' nullable dtypes say it (``Int64``, ``boolean``, ``Float64``): a plain float
    column of NaN is what ``obs[name] = np.nan`` makes of any placeholder, so it stays text, as
    object and categorical columns do.

    >>> [_dtype_kind(d) for d in ("Int64", "boolean", "Float64", "float64", "object")]
    ['int', 'bool', 'float', 'text', 'text']
    """
    if isinstance(dtype, str):
        dtype = pd.api.types.pandas_dtype(dtype)
    if not isinstance(dtype, pd.api.extensions.ExtensionDtype) or isinstance(dtype, pd.CategoricalDtype):
        return "text"
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_integer_dtype(dtype):
        return "int"
    if pd.api.types.is_float_dtype(dtype):
        return "float"
    return "text"


def _missing_value(v: object) -> bool:
    return v is None or v is pd.NA or v is pd.NaT or (isinstance(v, (float, np.floating)) and np.isnan(v))


def _object_kind(values: list) -> str | None:
    """Kind of an object column's non-missing values: text, bool, int or float; None when all are missing."""
    present = [v for v in values if not _missing_value(v)]
    if not present:
        return None
    if all(isinstance(v, str) for v in present):
        return "text"
    if all(isinstance(v, (bool, np.bool_)) for v in present):
        return "bool"
    numbers = [v for v in present if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
        v, (bool, np.bool_))]
    if len(numbers) == len(present):
        return "int" if all(isinstance(v, (int, np.integer)) for v in numbers) else "float"
    kinds = sorted({type(v).__name__ for v in present})
    return ("mixed: " if len(kinds) > 1 else "other: ") + ", ".join(kinds[:4])


def _column_values(series: pd.Series, name: str) -> tuple[str | None, list | np.ndarray]:
    """Return the kind of an obs column (None: every value missing, of no type) and its values to store."""
    dtype = series.dtype
    if len(series) and series.isna().all():  # no value says the kind: the stored one, or the dtype's (_dtype_kind)
        return None, [None] * len(series)
    if isinstance(dtype, pd.CategoricalDtype):
        return "text", [None if _missing_value(v) else str(v) for v in series.astype(object).tolist()]
    if pd.api.types.is_bool_dtype(dtype):
        return "bool", series.to_numpy(dtype=object, na_value=None).tolist()
    if pd.api.types.is_integer_dtype(dtype):
        return "int", series.to_numpy(dtype=object, na_value=None).tolist()
    if pd.api.types.is_float_dtype(dtype):
        return "float", series.to_numpy(dtype=np.float64, na_value=np.nan)
    if pd.api.types.is_string_dtype(dtype) or dtype == object:
        values = series.to_numpy(dtype=object).tolist()
        kind = _object_kind(values)
        if kind is not None and kind.startswith(("mixed", "other")):
            what = (f"values of several types ({kind[7:]}); the atlas keeps a column of one type" if kind[0] == "m"
                    else f"{kind[7:]} values, which the atlas does not store (text, integers, floats and booleans "
                    "are kept)")
            raise InputError(f"obs column {name!r} holds {what}: convert it (e.g. adata.obs[{name!r}] = "
                             f"adata.obs[{name!r}].astype(str)); nothing was written")
        return kind, [None if _missing_value(v) else v for v in values]
    raise InputError(f"obs column {name!r} has dtype {dtype}, which the atlas does not store (text, categories, "
                     f"integers, floats and booleans are kept): convert it (e.g. adata.obs[{name!r}] = "
                     f"adata.obs[{name!r}].astype(str)); nothing was written")


def _to_arrow(values: list | np.ndarray, kind: str, name: str) -> pa.Array:
    try:
        if kind == "float":
            return pa.array(np.asarray(values, dtype=np.float64), type=pa.float64(), from_pandas=True)  # NaN -> null
        if kind == "text":
            return pa.array([None if v is None else str(v) for v in values], type=pa.large_string())
        return pa.array([None if v is None else (bool(v) if kind == "bool" else int(v)) for v in values],
                        type=ARROW_TYPES[kind])
    except (OverflowError, pa.ArrowException, ValueError, TypeError) as exc:
        raise InputError(f"obs column {name!r} cannot be stored as {kind}: {exc}; nothing was written") from exc


GENE_TABLE_NAMES = frozenset({"var_id", "gene", "score", "log_fold_change", "pct_group", "pct_other"})
"""Names the store's var and the marker tables use themselves: a var column so named is kept as ``user_<name>``."""


def prepare_gene_columns(var: pd.DataFrame, genes: Sequence[str]) -> pa.Table:
    """Return the reference's gene annotations (``var`` columns such as ``gene_symbol``) for the atlas's ``genes``.

    Rows follow ``genes`` (a gene ``var`` lacks gets missing values). Columns of the kinds obs
    columns may have (text, categories, integers, floats, booleans) are kept; ``var_id``, the
    marker tables' own names (``gene``, ``score``, ...) and ``soma_*`` / ``__*`` names as ``user_<name>``. Columns of other kinds are left out with a warning:
    annotations never stop an atlas from being made.
    """
    frame = var.copy()
    frame.index = frame.index.astype(str)
    frame = frame[~frame.index.duplicated()].reindex([str(g) for g in genes])
    arrays, skipped = {}, []
    for name in frame.columns:
        if not isinstance(name, str) or not name.strip():
            skipped.append(str(name))
            continue
        kept = PREFIX + name if name.lower() in GENE_TABLE_NAMES or name.lower().startswith(FOREIGN_PREFIXES) else name
        try:
            kind, values = _column_values(frame[name], name)
            arrays[kept] = _to_arrow(values, kind or _dtype_kind(frame[name].dtype), name)
        except InputError:
            skipped.append(name)
    if skipped:
        log.warning("var column(s) %s are not of a kind the atlas stores (text, numbers, booleans) and were left "
                    "out of its gene annotations", ", ".join(repr(n) for n in skipped[:5]))
    return pa.table(arrays) if arrays else pa.table({})


def prepare_metadata(obs: pd.DataFrame, stored: dict[str, str]) -> Metadata:
    """Check the user's obs columns against the atlas's (``stored``: name -> kind) and return them as stored.

    Every column is kept. Names the engine uses itself (``dataset``, ``batch``, ``label``, ...,
    ``cell``, the prediction columns; letter case aside) and names starting with ``soma_`` or
    ``__`` (the cell store's own) are kept as ``user_<name>``. A column whose every value is
    missing takes the stored column's kind, or its nullable dtype's (``Int64``, ``boolean``,
    ``Float64``), else text. Refused with :class:`InputError`, before anything is written:
    names that are not text, empty, longer than 1,000 characters or with control characters;
    two columns whose names differ only in letter case (SQL could not tell them apart), also
    from a stored column; a column of another kind than the stored one (integers may join a
    float column); dtypes other than text, categories, integers, floats and booleans; object
    columns of mixed types.
    """
    bad = [n for n in obs.columns if not isinstance(n, str) or not n.strip() or len(n) > MAX_NAME_LENGTH
           or any(ord(ch) < 32 or ord(ch) == 127 for ch in n)]
    if bad:
        raise InputError(f"obs column name(s) {_examples([str(b)[:40] for b in bad])} cannot be kept: names must "
                         f"be text of 1 to {MAX_NAME_LENGTH} characters without control characters; rename them; "
                         "nothing was written")
    renamed = {n: PREFIX + n for n in obs.columns if _reserved(n)}
    target = {n: renamed.get(n, n) for n in obs.columns}
    by_lower = Counter(t.lower() for t in target.values())
    twins = sorted(n for n, t in target.items() if by_lower[t.lower()] > 1)
    if twins:
        raise InputError(f"obs columns {_examples(twins)} have the same name once letter case is ignored (engine "
                         f"names are kept as {PREFIX}<name>): SQL could not tell them apart; rename them; nothing "
                         "was written")
    stored_lower = {k.lower(): k for k in stored}
    problems = []
    columns: dict[str, str] = {}
    arrays = []
    for name, kept in target.items():
        known = stored_lower.get(kept.lower())
        if known is not None and known != kept:
            problems.append(f"{name!r} differs only in letter case from the atlas's column {known!r}")
            continue
        kind, values = _column_values(obs[name], name)
        was = stored.get(kept)
        if kind is None:  # every value missing: the column's stored kind, or its dtype's (text for objects)
            kind = was or _dtype_kind(obs[name].dtype)
        elif was is not None and kind != was:
            if not (kind == "int" and was == "float"):
                hint = (f" (integers with missing values: adata.obs[{name!r}].astype('Int64'))"
                        if (kind, was) == ("float", "int") else "")
                problems.append(f"{name!r} holds {kind} values where the atlas stores {was}{hint}")
                continue
            kind = "float"
        columns[kept] = kind
        arrays.append(_to_arrow(values, kind, name))
    if problems:
        raise InputError(f"obs column(s) conflict with the columns stored in the atlas: {'; '.join(problems)}. "
                         "Convert or rename them (e.g. adata.obs[name].astype(str), or a new name); nothing was "
                         "written")
    if renamed:
        log.warning("obs column(s) %s are named like the engine's own columns and are kept as %s",
                    ", ".join(repr(n) for n in renamed), ", ".join(repr(v) for v in renamed.values()))
    table = pa.table(dict(zip(columns, arrays))) if columns else pa.table({})
    return Metadata(table, columns, renamed)
