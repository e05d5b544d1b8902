"""A small atlas to try the API on and to run the examples of the docstrings with."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from atlasengine.api.atlas import Atlas
from atlasengine.datasets import pancreas
from atlasengine.errors import InputError

EXAMPLE_CONFIG = {"model": {"n_hidden": 16, "n_latent": 4}, "reference_training": {"max_epochs": 3},
                  "query_training": {"max_epochs": 2}, "continual": {"fisher_max_cells": 100, "replay_max_cells": 100}}
"""A tiny model and few epochs: an example atlas builds in about a second (its figures mean nothing)."""

_BUILT: list[tempfile.TemporaryDirectory] = []
"""The first example atlas this process built; later calls copy it (the build is seeded, so the same)."""


def example_atlas(path: str | Path) -> Atlas:
    """Build a small two-version atlas at ``path`` from the packaged pancreas set, to try the API on.

    Version 1: celseq, fluidigmc1 and indrop without their ductal cells (batch ``tech``, label
    ``celltype``); version 2: celseq2 folded in with ``ewc``, its ductal cells new to the atlas.
    Trained at :data:`EXAMPLE_CONFIG` (tiny model, few epochs), so it is quick and its mapping is
    rough; smartseq2 is left for a next ingest (:func:`atlasengine.datasets.pancreas`). A process
    builds it once and copies it for later calls.

    >>> atlas = example_atlas(getfixture("tmp_path") / "example.atlas")
    >>> atlas.version, atlas.batches
    (2, ['celseq', 'fluidigmc1', 'indrop', 'celseq2'])
    """
    if not _BUILT:
        folder = tempfile.TemporaryDirectory(prefix="atlasengine-example-")
        data = pancreas()
        ref = data[data.obs["tech"].isin(["celseq", "fluidigmc1", "indrop"]) & (data.obs["celltype"] != "ductal")]
        atlas = Atlas.create(Path(folder.name) / "example.atlas", ref.copy(), batch_key="tech", label_key="celltype",
                             config=EXAMPLE_CONFIG, runtime={"progress": False})
        atlas.ingest(data[data.obs["tech"] == "celseq2"].copy(), batch_key="tech", runtime={"progress": False})
        _BUILT.append(folder)
    target = Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(f"{target} already exists; choose a new path for the example atlas")
    if target.exists():
        target.rmdir()
    shutil.copytree(Path(_BUILT[0].name) / "example.atlas", target, ignore=shutil.ignore_patterns(".write.lock"))
    return Atlas.open(target)
