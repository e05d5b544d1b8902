"""Atlas format 2 -> 3: settings of the machine leave the manifest.

Format 2 stored ``accelerator``, ``devices`` and ``progress_bar`` in the manifest's
``reference_training`` and ``query_training`` beside the science settings, so an atlas made
on a GPU machine asked for the GPU when opened elsewhere. They are now given per call
(``runtime=``) and never stored; this step drops them. Each version's ``config.json`` is a
record of the run and keeps them as they were.
"""

from __future__ import annotations

FROM_VERSION = 2
TO_VERSION = 3
MACHINE_SETTINGS = ("accelerator", "devices", "progress_bar")


def upgrade_manifest(raw: dict) -> dict:
    """Return the manifest without the machine settings in its training sections."""
    config = dict(raw.get("config") or {})
    for section in ("reference_training", "query_training"):
        if isinstance(config.get(section), dict):
            config[section] = {k: v for k, v in config[section].items() if k not in MACHINE_SETTINGS}
    return {**raw, "config": config}
