"""The report as a person sees it: headless Chromium (Debian's `chromium`, installed by `make test` when missing)
loads the file and every embedded plot decodes to a real image."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from moekit.report import render_report
from tests.report.test_html import FIGURES, _results

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=10000"]

# appended to a copy of the report: after load, record which figures hold a decoded image
PROBE = """<script>
window.addEventListener("load", () => {
  const ok = [...document.querySelectorAll("figure")].filter(f => {
    const img = f.querySelector("img"); return img && img.complete && img.naturalWidth > 100 && img.naturalHeight > 100;
  }).map(f => f.id);
  document.body.setAttribute("data-decoded", ok.join(","));
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it)")
def test_every_plot_renders_in_chromium(tmp_path):
    report = render_report(_results(np.random.default_rng(0)), tmp_path / "report.html")
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    decoded = re.search(r'data-decoded="([^"]*)"', dom)
    assert decoded, f"chromium did not run the page (stdout starts {dom[:200]!r})"
    assert set(FIGURES) <= set(decoded.group(1).split(","))
    screenshot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={screenshot}",
                    "--window-size=1200,2000", report.as_uri()], capture_output=True, timeout=120)
    assert screenshot.stat().st_size > 10_000  # a page with plots, not a blank one
