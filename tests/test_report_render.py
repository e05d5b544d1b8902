"""The drift audit report renders with its figures in a real browser (headless Chromium)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from atlasengine import Atlas

CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute('data-images', imgs.length + '/' + ok);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is required in CI (apt-get install chromium)")
    pytest.skip("Chromium is not installed (apt-get install chromium)")


def test_report_renders_all_figures_in_chromium(atlas_path, pancreas_query, tmp_path):
    browser = _chromium()
    atlas = Atlas.open(atlas_path)
    atlas.ingest(pancreas_query, batch_key="tech", strategy="ewc", label_key="celltype")
    report = atlas.report(tmp_path / "audit.html")
    html = report.read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html  # self-contained
    for section in ("Version history", "Drift measures over versions", "Per cell type", "Label transfer"):
        assert section in html
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", CHECK + "</body>"), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert m, "the report did not finish loading in Chromium"
    total, decoded = int(m.group(1)), int(m.group(2))
    assert total >= 10 and decoded == total, (total, decoded)
    shot = tmp_path / "audit.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1280,4000", report.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000
