"""Machine settings are checked before anything is written: none trains in several processes or on a missing device."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import DATA, TINY, snapshot

from atlasengine import Atlas, InputError

TWO_DEVICES = """
import sys, anndata as ad
from atlasengine import Atlas, InputError
a = ad.read_h5ad(sys.argv[2])
q = a[a.obs["tech"] == "smartseq2"].copy()
try:
    Atlas.open(sys.argv[1]).ingest(q, batch_key="tech", strategy="surgery", runtime={"devices": 2})
except InputError as exc:
    print("refused:", exc)
"""


def test_two_devices_on_cpu_are_refused_before_anything_is_written(atlas_path):
    before = snapshot(atlas_path)  # in another process: Lightning would relaunch this one as a second rank
    proc = subprocess.run([sys.executable, "-c", TWO_DEVICES, str(atlas_path), str(DATA / "pancreas_panc8_small.h5ad")],
                          capture_output=True, text=True, timeout=180)
    assert "refused: runtime devices=2 means 2 training processes" in proc.stdout, proc.stderr[-2000:]
    assert snapshot(atlas_path) == before


@pytest.mark.parametrize("runtime", [{"accelerator": "bogus"}, {"accelerator": "mps"}])  # mps: Apple only
def test_a_device_setting_that_cannot_run_is_refused_before_anything_is_written(atlas_path, pancreas_query, tmp_path,
                                                                                 runtime):
    before = snapshot(atlas_path)
    with pytest.raises(InputError, match="runtime accelerator=.* cannot run here"):
        Atlas.open(atlas_path).ingest(pancreas_query, batch_key="tech", strategy="surgery", runtime=runtime)
    assert snapshot(atlas_path) == before
    with pytest.raises(InputError, match="runtime accelerator=.* cannot run here"):
        Atlas.create(tmp_path / "new.atlas", pancreas_query, batch_key="tech", label_key="celltype", config=TINY,
                     runtime=runtime)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pancreas.atlas"]
