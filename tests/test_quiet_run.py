"""A normal run prints no library tips and no deprecation or future warnings (the test settings hide them)."""

from __future__ import annotations

import os
import subprocess
import sys

RUN = r"""
import sys
import anndata as ad
from atlasengine import Atlas, example_atlas
from atlasengine.datasets import pancreas

out = sys.argv[1]
atlas = example_atlas(out + "/a.atlas")
data = pancreas()
query = data[data.obs.tech == "smartseq2"].copy()
pred = atlas.transfer_labels(query, batch_key="tech")
res = atlas.ingest(query, batch_key="tech", runtime={"progress": True})
res.to_anndata().write_h5ad(out + "/query.h5ad")
atlas.to_anndata(counts=True).write_h5ad(out + "/atlas.h5ad")
groups = atlas.unknown_groups()
obs = atlas.obs()
atlas.relabel(obs.index[obs["label"] == "acinar"][:3], "acinar_like")
atlas.sql("select count(*) from cells")
atlas.audit(out + "/audit.html")
Atlas.open(out + "/a.atlas", version=1).latent()
print("done")
"""


def test_a_normal_session_prints_no_warning(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "ATLASENGINE_FAULT")}
    done = subprocess.run([sys.executable, "-c", RUN, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)  # Python's own warning filters, as in a user's script
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr[-3000:]
    warned = [line for line in done.stderr.splitlines() if "Warning" in line or "warnings.warn" in line]
    assert not warned, "\n".join(warned[:10])
