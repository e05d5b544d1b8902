"""Label overrides: the labels a ``relabel`` version gave to cells, on top of the labels stored with them.

The cells' obs in the cell store, their labels included, are checksummed when written and never
rewritten. A relabel version instead writes ``labels.parquet`` into its own directory: one row
per renamed cell (``soma_joinid``, ``cell`` name, ``label``), holding every override made up to
that version (the parent's, then the new ones, a later one replacing an earlier one for the same
cell). A reader of version N applies the file of the newest version at or before N that has one;
versions without one (every version but relabels, and every version of older atlases) add none.

Example
-------
>>> import numpy as np
>>> path = getfixture("tmp_path") / "labels.parquet"
>>> write_label_overrides(path, np.array([4, 7]), ["c4", "c7"], ["ductal", "ductal"])
>>> read_label_overrides(path).reset_index().to_dict("list")
{'soma_joinid': [4, 7], 'cell': ['c4', 'c7'], 'label': ['ductal', 'ductal']}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from atlasengine.errors import AtlasIntegrityError, AtlasWriteError

LABELS = "labels.parquet"
"""The file name of a version's label overrides."""
LABELS_SCHEMA = pa.schema([("soma_joinid", pa.int64()), ("cell", pa.large_string()), ("label", pa.large_string())])


def empty_overrides() -> pd.DataFrame:
    """Return an override table with no rows (index ``soma_joinid``; columns ``cell``, ``label``)."""
    return pd.DataFrame({"cell": pd.Series([], dtype=object), "label": pd.Series([], dtype=object)},
                        index=pd.Index([], dtype=np.int64, name="soma_joinid"))


def merge_overrides(old: pd.DataFrame, joinids: np.ndarray, cells: Sequence[str], label: str) -> pd.DataFrame:
    """Return ``old`` with the cells ``joinids`` (named ``cells``) set to ``label``, ordered by joinid."""
    new = pd.DataFrame({"cell": [str(c) for c in cells], "label": label},
                       index=pd.Index(np.asarray(joinids, dtype=np.int64), name="soma_joinid"))
    merged = pd.concat([old[~old.index.isin(new.index)], new])
    return merged.sort_index()


def write_label_overrides(path: Path, joinids: np.ndarray, cells: Sequence[str], labels: Sequence[str]) -> None:
    """Write the overrides (one row per cell) to ``path`` as Parquet."""
    table = pa.table({"soma_joinid": np.asarray(joinids, dtype=np.int64), "cell": [str(c) for c in cells],
                      "label": [str(v) for v in labels]}, schema=LABELS_SCHEMA)
    try:
        pq.write_table(table, path)
    except OSError as exc:
        raise AtlasWriteError(f"cannot write the label overrides {path}: {exc}") from exc


def read_label_overrides(path: Path) -> pd.DataFrame:
    """Read the overrides written by :func:`write_label_overrides` (index ``soma_joinid``; ``cell``, ``label``)."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise AtlasIntegrityError(f"the label overrides {path} cannot be read: {exc}") from exc
    if not table.schema.equals(LABELS_SCHEMA) or table.column("label").null_count:
        raise AtlasIntegrityError(f"the label overrides {path} do not hold (soma_joinid, cell, label) rows")
    df = table.to_pandas().set_index("soma_joinid")
    df["cell"], df["label"] = df["cell"].astype(object), df["label"].astype(object)
    if not df.index.is_unique:
        raise AtlasIntegrityError(f"the label overrides {path} name a cell twice")
    return df
