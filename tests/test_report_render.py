"""The audit report works in a real browser (headless Chromium) with the network off.

A probe script is put first in a copy of the report's head: it records every error the page
logs (window errors, console.error, Content-Security-Policy violations, resources fetched) and,
once the page has loaded, writes into the DOM what the summary shows, how many points the
interactive embedding draws, what hovering its first point shows and what the colour menu does;
``--dump-dom`` hands the DOM back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from atlasengine import Atlas

PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push('error: ' + (e.message || (e.target && e.target.src))),
                        true);
window.addEventListener('unhandledrejection', e => window.__errors.push('rejection: ' + e.reason));
document.addEventListener('securitypolicyviolation', e => window.__errors.push('csp: ' + e.blockedURI));
const __consoleError = console.error;
console.error = function (...args) { window.__errors.push('console: ' + args.join(' ')); };
window.addEventListener('load', () => setTimeout(() => {
  const out = {};
  out.statuses = [...document.querySelectorAll('#checks .card')].map(c => [c.dataset.check, c.dataset.status,
    c.querySelector('.value').textContent, c.querySelector('.rule').textContent]);
  out.overall = document.getElementById('checks').dataset.status;
  out.kpis = [...document.querySelectorAll('#summary .kpis li')].map(li => li.textContent);
  const div = document.getElementById('fig-embedding');
  out.points = div && div._fullData ? div._fullData[0].x.length : -1;
  out.svgPoints = div ? div.querySelectorAll('.scatterlayer .point').length : -1;
  try {
    Plotly.Fx.hover(div, [{curveNumber: 0, pointNumber: 0}]);
    const hover = div.querySelector('.hoverlayer .hovertext');
    out.hover = hover ? hover.textContent : null;
  } catch (e) { window.__errors.push('hover: ' + e); }
  const buttons = div.layout.updatemenus[0].buttons;
  out.menu = buttons.map(b => b.label);
  const before = Array.from(div._fullData[0].marker.color).join(',');
  Plotly.restyle(div, buttons[1].args[0]);
  out.recoloured = Array.from(div._fullData[0].marker.color).join(',') !== before;
  out.plots = [...document.querySelectorAll('.plotly-graph-div')].map(d => [d.id, !!(d._fullData &&
    d.querySelector('.main-svg'))]);
  out.cloud = document.querySelectorAll('[data-title="Share chart..."]').length;
  out.resources = performance.getEntriesByType('resource').map(r => r.name);
  out.errors = window.__errors;
  const pre = document.createElement('pre');
  pre.id = 'probe-result';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 500));
</script>"""

NO_NETWORK = ["--proxy-server=socks5://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
              "--host-resolver-rules=MAP * ~NOTFOUND", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-domain-reliability"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is required in CI (apt-get install chromium)")
    pytest.skip("Chromium is not installed (apt-get install chromium)")


def _flags(tmp_path: Path) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", *NO_NETWORK, f"--user-data-dir={tmp_path / 'profile'}"]


def _probe(browser: str, report: Path, tmp_path: Path) -> dict:
    text = report.read_text(encoding="utf-8")
    assert text.count("<head>") == 1
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    dom = subprocess.run([browser, *_flags(tmp_path), "--virtual-time-budget=20000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=180).stdout
    m = re.search(r'<pre id="probe-result">(.*?)</pre>', dom, flags=re.S)
    assert m, "the report did not finish loading in Chromium"
    return json.loads(m.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')
                      .replace("&amp;", "&"))


def test_report_is_interactive_offline_and_error_free_in_chromium(atlas_path, pancreas_query, tmp_path):
    browser = _chromium()
    atlas = Atlas.open(atlas_path)
    res = atlas.ingest(pancreas_query, batch_key="tech", strategy="ewc", label_key="celltype")
    report = atlas.audit(tmp_path / "audit.html")
    text = report.path.read_text(encoding="utf-8")
    assert "Content-Security-Policy" in text and text.count("Plotly.newPlot") >= 5
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)\s*=", text, flags=re.I)  # nothing loaded
    assert report.path.stat().st_size < 8e6

    out = _probe(browser, report.path, tmp_path)
    assert out["errors"] == [] and out["resources"] == [], (out["errors"], out["resources"])
    # the summary: one status per check, each with its number and threshold
    assert [s[0] for s in out["statuses"]] == ["displacement_mean_aligned", "knn_preservation_mean",
                                               "label_accuracy_drop", "ilisi_norm_drop"]
    assert {s[1] for s in out["statuses"]} <= {"green", "amber", "red", "grey"}
    assert [s[1] for s in out["statuses"]] == [c.status for c in report.checks]
    assert all(re.fullmatch(r"red (above|below) [0-9.]+", s[3]) for s in out["statuses"])
    assert out["overall"] == report.status
    drift = atlas.drift()
    shown = float(out["statuses"][0][2])
    stored = drift[(drift.version == 2) & (drift.scope == "vs_first")]["displacement_mean_aligned"].iloc[0]
    assert shown == pytest.approx(stored, abs=5e-4)  # the number is the drift table's
    unknown = res.predictions["is_unknown"].mean()
    assert any(f"{100 * unknown:.1f}%" in k and "Unknown" in k for k in out["kpis"]), out["kpis"]
    # the interactive embedding draws every cell of this small atlas, hover names the cell
    n = len(atlas.obs())
    assert out["points"] == n and out["svgPoints"] == n
    first = atlas.obs().iloc[0]
    assert out["hover"] is not None and out["hover"].startswith(str(first.name)), out["hover"]
    assert first["batch"] in out["hover"] and "uncertainty" in out["hover"]
    assert out["menu"][:3] == ["cell type", "batch", "version added"] and out["recoloured"]
    assert all(ok for _, ok in out["plots"]) and len(out["plots"]) >= 5, out["plots"]
    assert out["cloud"] == 0  # no button that would upload the chart

    shot = tmp_path / "audit.png"
    subprocess.run([browser, *_flags(tmp_path), f"--screenshot={shot}", "--window-size=1280,900",
                    report.path.as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000
