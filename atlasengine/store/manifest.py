"""The atlas manifest: the single source of truth for which versions are committed.

A version exists exactly when the manifest lists it; the manifest is replaced atomically
(write to a temporary file, fsync, rename), so a crash leaves the previous manifest intact.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from atlasengine.config import AtlasConfig, FoldInStrategy, validation_problems
from atlasengine.errors import AtlasFormatError
from atlasengine.store.files import atomic_write_text
from atlasengine.store.metadata import Kind
from atlasengine.version import __version__

FORMAT_VERSION = 9
"""1: no drift database (before 2026-11-27); 2: drift.duckdb; 3: machine settings not stored; 4: the Fisher
is a per-cell mean with the cells it represents; 5: each version keeps its drift rows as Parquet parts and the
checksums of the cells it added in its directory; 6: every obs column of the user's data is kept (a table per
dataset in the cell store, its columns in the dataset's record) and checksummed with the cells; a
``relabel`` version carries ``labels.parquet`` (label overrides; absent from every other version, so older
format-6 atlases need no step); 7: novelty signals averaged over neighbouring cells, the genes' own columns
kept; 8: the continual settings hold ``embedding_anchor``; 9: ``batch_drift`` holds ``ilisi_first_version_mean`` (batch
mixing among version 1's cells). Each step up has a migration in
``migrations/layout/``."""
MANIFEST_NAME = "manifest.json"

Strategy = Literal["reference", "relabel"] | FoldInStrategy


def _now() -> datetime:
    return datetime.now(timezone.utc)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileRecord(_Record):
    """A file of a version, relative to the atlas root, with its checksum."""

    path: str
    sha256: str
    size: int


class DatasetRecord(_Record):
    """One AnnData folded into the atlas: its cells occupy ``[joinid_start, joinid_stop)``."""

    name: str
    version: int
    joinid_start: int
    joinid_stop: int
    batch_key: str
    label_key: str | None = None
    batches: list[str]
    genes_matched: int
    genes_padded: int
    obs_columns: dict[str, Kind] = Field(default_factory=dict)
    """The dataset's own obs columns as stored (name -> kind), in its order; see ``store/metadata.py``."""

    @property
    def n_cells(self) -> int:
        """Number of cells of the dataset (the size of its joinid range)."""
        return self.joinid_stop - self.joinid_start


class RelabelRecord(_Record):
    """What a relabel version renamed: ``n_cells`` cells now labelled ``label``, and what they were before."""

    label: str
    n_cells: int
    from_labels: dict[str, int] = Field(default_factory=dict)
    """Each earlier label of the renamed cells -> how many of them carried it."""
    from_unlabelled: int = 0
    """How many of the renamed cells had no label (ingested without one)."""
    note: str | None = None


class VersionInfo(_Record):
    """A committed model version: what produced it and the files that hold it.

    A ``relabel`` version changes labels only (``relabel`` says which); its weights, Fisher and
    embeddings are its parent's.
    """

    number: int
    created_at: datetime = Field(default_factory=_now)
    strategy: Strategy
    parent: int | None = None
    datasets: list[str]
    n_cells: int
    n_new_cells: int
    batches: list[str]
    labels: list[str]
    files: dict[str, FileRecord] = Field(default_factory=dict, repr=False)  # shown in full, a version was 14 KB
    training: dict[str, Any] = Field(default_factory=dict, repr=False)
    fisher: dict[str, Any] = Field(default_factory=dict, repr=False)
    relabel: RelabelRecord | None = None


class Manifest(_Record):
    """Top-level description of an atlas (format ``FORMAT_VERSION``)."""

    format_version: int = FORMAT_VERSION
    engine_version: str = __version__
    created_at: datetime = Field(default_factory=_now)
    n_genes: int
    label_key: str
    config: AtlasConfig
    datasets: list[DatasetRecord] = Field(default_factory=list)
    versions: list[VersionInfo] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        """Refuse a manifest whose records contradict each other (a damaged file read as valid JSON).

        Versions are numbered 1, 2, ... in order, each the child of the one before; datasets hold
        joinid ranges in increasing order that do not overlap (a failed write's joinids are never
        given out again, so gaps are allowed), each added by a listed version; a version holds
        the cells of the datasets added up to it.
        """
        numbers = [v.number for v in self.versions]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"versions are numbered {numbers}, not 1 to {len(numbers)} in order")
        for v in self.versions:
            if v.parent != (v.number - 1 if v.number > 1 else None):
                raise ValueError(f"version {v.number} names version {v.parent} as its parent")
        stop = 0
        for d in self.datasets:
            if d.joinid_start < stop or d.joinid_stop < d.joinid_start:
                raise ValueError(f"dataset {d.name!r} holds joinids [{d.joinid_start}, {d.joinid_stop}) after {stop}")
            if numbers and not 1 <= d.version <= numbers[-1]:
                raise ValueError(f"dataset {d.name!r} was added by version {d.version}, which is not listed")
            stop = d.joinid_stop
        for v in self.versions:
            held = sum(d.n_cells for d in self.datasets if d.version <= v.number)
            if v.n_cells != held:
                raise ValueError(f"version {v.number} records {v.n_cells} cells, its datasets hold {held}")
        return self

    @property
    def current(self) -> int:
        """Number of the newest committed version."""
        return self.versions[-1].number

    def version(self, number: int) -> VersionInfo:
        """Return the record of version ``number`` (:class:`AtlasFormatError` if it does not exist)."""
        for v in self.versions:
            if v.number == number:
                return v
        known = [v.number for v in self.versions]
        raise AtlasFormatError(f"version {number} does not exist in this atlas (versions: {known})")

    def datasets_until(self, number: int) -> list[DatasetRecord]:
        """Datasets whose cells belong to the atlas at version ``number``, in joinid order."""
        return [d for d in self.datasets if d.version <= number]

    def obs_columns(self, number: int | None = None) -> dict[str, Kind]:
        """Own obs columns of the datasets up to version ``number`` (default: all), name -> kind, first seen first."""
        out: dict[str, Kind] = {}
        for d in self.datasets if number is None else self.datasets_until(number):
            for name, kind in d.obs_columns.items():
                out.setdefault(name, kind)
        return out

    def truncated(self, number: int) -> "Manifest":
        """Return this manifest as it was when ``number`` was the newest version."""
        return self.model_copy(
            update={
                "datasets": self.datasets_until(number),
                "versions": [v for v in self.versions if v.number <= number],
            }
        )


class AtlasNeedsUpgrade(AtlasFormatError):
    """The atlas was written in an older format; ``Atlas.open`` upgrades it."""

    def __init__(self, root: Path, found: int) -> None:
        super().__init__(f"atlas {root} is in format {found}; this atlasengine writes format {FORMAT_VERSION}")
        self.found = found


def read_raw_manifest(root: Path) -> dict[str, Any]:
    """Read the manifest as a dict, after checking it is one and not of a newer format."""
    path = root / MANIFEST_NAME
    if not root.exists():
        raise AtlasFormatError(f"{root} does not exist")
    if not path.exists():
        raise AtlasFormatError(f"{root} is not an atlas: it has no {MANIFEST_NAME}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8 (a flipped byte)
        raise AtlasFormatError(f"{path} is not a readable atlas manifest: {exc}") from exc
    fmt = raw.get("format_version") if isinstance(raw, dict) else None
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise AtlasFormatError(f"{path} has no format_version that is a whole number from 1: not an atlas manifest "
                               f"(it reads {fmt!r})")
    if fmt > FORMAT_VERSION:
        raise AtlasFormatError(
            f"atlas {root} was written in format {fmt}, newer than this atlasengine supports "
            f"({FORMAT_VERSION}); upgrade atlasengine to open it"
        )
    return raw


def parse_manifest(root: Path, raw: dict[str, Any]) -> Manifest:
    """Validate a manifest dict (any known format) into the model."""
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise AtlasFormatError(f"{root / MANIFEST_NAME} is corrupt: {validation_problems(exc, 'manifest')}") from exc


def read_manifest(root: Path) -> Manifest:
    """Read and validate ``root/manifest.json``; refuse newer formats, flag older ones for upgrade."""
    raw = read_raw_manifest(root)
    if raw["format_version"] < FORMAT_VERSION:
        raise AtlasNeedsUpgrade(root, raw["format_version"])
    return parse_manifest(root, raw)


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Atomically replace the manifest: the commit point of every change."""
    atomic_write_text(root / MANIFEST_NAME, manifest.model_dump_json(indent=2))
