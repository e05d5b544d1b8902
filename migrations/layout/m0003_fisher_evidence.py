"""Atlas format 3 -> 4: the Fisher says how many cells it represents.

Up to format 3 each version stored ``F = gamma * F_parent + F_version``, where ``F_version`` was
a per-cell mean over every atlas cell at that version: a sum of per-cell means that counted
old cells again at every version, with no cell count. Format 4 stores a per-cell mean with the
number of cells behind it (``represented_cells``), so the EWC penalty can weigh the reference by
its evidence. Checkpoints are not rewritten: each version's manifest record says how to read
its stored Fisher (``kind = "sum_of_version_means"``, divided by ``n_means``, the sum of the
discounts over the versions it accumulated) and counts the version's cells.

The atlas's own settings keep their meaning: ``continual.penalty_scale`` is set to ``"fixed"``,
the only scale format 3 had, so the stored ``ewc_lambda`` pulls as hard as before. Set it to
``"evidence"`` to weigh the reference by its cells.
"""

from __future__ import annotations

FROM_VERSION = 3
TO_VERSION = 4


def upgrade_manifest(raw: dict) -> dict:
    """Record what each version's stored Fisher is; keep the stored penalty's meaning."""
    versions = []
    for record in raw.get("versions", []):
        fisher = dict(record.get("fisher") or {})
        gamma = float(fisher.get("gamma", 1.0))
        n_versions = int(record["number"])  # versions are a chain 1..number, each added its Fisher
        fisher.update(kind="sum_of_version_means", n_means=sum(gamma**j for j in range(n_versions)),
                      represented_cells=int(record["n_cells"]))
        versions.append({**record, "fisher": fisher})
    config = dict(raw.get("config") or {})
    config["continual"] = {**(config.get("continual") or {}), "penalty_scale": "fixed"}
    return {**raw, "versions": versions, "config": config}
