"""The engine's own error types: every failure a user can cause names its problem."""

from __future__ import annotations


class AtlasError(Exception):
    """Base class of every error atlasengine raises on purpose."""


class InputError(AtlasError, ValueError):
    """The AnnData (or argument) given by the user cannot be used as it is."""


class AtlasFormatError(AtlasError):
    """The path is not an atlas, or it was written by an unknown (newer) format."""


class AtlasIntegrityError(AtlasError):
    """A file of a committed version is missing or does not match its recorded checksum."""


class AtlasLockedError(AtlasError):
    """Another process holds the atlas's write lock."""


class AtlasConflictError(AtlasError):
    """Another writer committed while this one worked; nothing of this write was committed."""


class AtlasWriteError(AtlasError):
    """A file could not be written (disk full, no permission); nothing was committed."""


class ReadOnlyError(AtlasError):
    """A write was attempted on an atlas opened read-only (e.g. at an earlier version)."""


class TrainingError(AtlasError):
    """Training failed (for example the loss became NaN); nothing was committed."""
