"""Which cells of an atlas a user means: cell names, or a boolean mask over ``atlas.obs()``.

One reading for every method that takes ``cells`` (``relabel``, ``to_anndata``): a pandas
Series mask is read by its index (the cell names), a list or array by position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from atlasengine.errors import InputError

CellSelection = Sequence[str] | np.ndarray | pd.Series | pd.Index
"""Cell names, or a boolean mask over ``atlas.obs()``'s rows."""


def _aligned_mask(mask: pd.Series, obs: pd.DataFrame) -> pd.Series:
    """Return a boolean Series mask in ``obs``'s row order, read by its index (the cell names)."""
    index, cells = mask.index.astype(str), obs.index.astype(str)
    if index.equals(cells):
        return mask
    if index.is_unique and len(index) == len(cells) and index.isin(cells).all():
        return pd.Series(mask.to_numpy(), index=index).reindex(cells)  # e.g. a sorted obs()
    raise InputError("a boolean Series selects cells by its index, and this one's index is not the atlas's cell "
                     f"names (e.g. {', '.join(repr(str(i)[:40]) for i in mask.index[:3])}): build it from "
                     "atlas.obs(), or pass a list or NumPy array of booleans in atlas.obs()'s row order")


def select_cells(obs: pd.DataFrame, cells: CellSelection, number: int, *, ordered: bool = False) -> np.ndarray:
    """Return the row positions in ``obs`` that ``cells`` selects: sorted and distinct, or as ordered.

    ``ordered``: names keep the order given (a name given twice is refused); a mask gives
    ``obs``'s row order either way. The selection may be empty.

    ``cells``: cell names (``obs``'s index), or a boolean mask with one entry per ``obs`` row (a
    pandas Series is read by its index, so a mask built from a sorted ``obs()`` selects the cells
    it names; a list or array by position).
    Unknown names, a mask of another length, integers (positions are not accepted) and missing
    mask values raise :class:`InputError`.

    >>> obs = pd.DataFrame(index=["a", "b", "c"])
    >>> select_cells(obs, ["c", "a", "c"], 2), select_cells(obs, [False, True, False], 2)
    (array([0, 2]), array([1]))
    """
    if isinstance(cells, (str, bytes)):
        raise InputError(f"cells must be a list of cell names or a boolean mask, not one text ({cells[:60]!r}); "
                         "pass [name] for one cell")
    if isinstance(cells, (pd.Series, pd.Index)):
        if pd.api.types.is_bool_dtype(cells.dtype) and cells.isna().any():
            raise InputError(f"the cell mask has {int(cells.isna().sum())} missing value(s); it must be True or False "
                             "for every cell")
        if isinstance(cells, pd.Series) and pd.api.types.is_bool_dtype(cells.dtype):
            cells = _aligned_mask(cells, obs)
        values = cells.to_numpy(dtype=bool) if pd.api.types.is_bool_dtype(cells.dtype) else cells.to_numpy()
    else:
        values = np.asarray(list(cells) if not isinstance(cells, np.ndarray) else cells)
    if values.ndim != 1:
        raise InputError(f"cells must be one-dimensional (names or a mask), got shape {values.shape}")
    if values.dtype == bool:
        if len(values) != len(obs):
            raise InputError(f"the cell mask has {len(values)} entries for the {len(obs)} cells of version {number} "
                             "(a mask must be aligned to atlas.obs())")
        rows = np.flatnonzero(values)
    elif len(values) and np.issubdtype(values.dtype, np.number):
        raise InputError(f"cells must be cell names or a boolean mask, got {values.dtype} numbers (positions are not "
                         "accepted: use atlas.obs().index[positions])")
    else:
        names = pd.Index([str(c) for c in values])
        rows = obs.index.get_indexer(names)
        if (rows < 0).any():
            missing = list(dict.fromkeys(names[rows < 0]))
            raise InputError(f"{len(missing)} cell name(s) not in the atlas at version {number}: "
                             f"{', '.join(repr(m[:60]) for m in missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if not ordered:
            rows = np.unique(rows)
        elif len(np.unique(rows)) < len(rows):
            twice = names[pd.Index(rows).duplicated()].unique()
            raise InputError(f"cell name(s) given more than once: {', '.join(repr(m[:60]) for m in twice[:5])}")
    return rows
