"""Atlas format 6 -> 7: novelty signals averaged over neighbouring cells.

Format 7 averages each novelty signal (distance to the reference, kNN uncertainty) over a cell's
nearest cells of its own batch before its p-value (``TransferConfig.novelty_smoothing``, default
10), and each version's ``novelty_calibration.npz`` records how many cells it averaged over
(calibration format 2). A format-6 atlas computed its novelty without averaging: this step
records that (``novelty_smoothing: 1`` in the manifest's transfer settings), so the atlas keeps
calling cells as it did until its owner changes the setting. New atlases call Unknown by the
novelty rule by default (``unknown_rule="novelty"``); an upgraded atlas keeps the rule it stored
(format 6 stored it; where a manifest lacks it, the old default ``"uncertainty"`` is recorded). The version files stay as they
are: a format-1 calibration reads as ``smoothing = 1``.

Format 7 also keeps the reference AnnData's own gene columns (``var``, e.g. ``gene_symbol``) in
the cell store's ``var`` beside ``var_id`` (``Atlas.var()``, marker genes named by them). A
format-6 atlas kept none and reads as having none: nothing to convert.
"""

from __future__ import annotations

FROM_VERSION = 6
TO_VERSION = 7


def upgrade_manifest(raw: dict) -> dict:
    """Record that the atlas's novelty signals were not averaged (``novelty_smoothing: 1``)."""
    config = dict(raw.get("config") or {})
    transfer = dict(config.get("transfer") or {})
    transfer.setdefault("novelty_smoothing", 1)
    transfer.setdefault("unknown_rule", "uncertainty")  # the default until format 7 (stored by every format-6 atlas)
    return {**raw, "config": {**config, "transfer": transfer}}
