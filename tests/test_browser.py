"""The dashboards in a real browser: Voila serves the notebooks, headless Chromium drives them.

Notebook 3 (CorrAdapter) is served with ``CORRLAB_NB_FAST=1`` (tiny sizes); the test toggles CorrAdapter
in the intervention panel, clicks Run and asserts that the displayed before / after figure changed (the
bytes of the ``<img>`` it shows). Notebook 2 supplies the accuracy dashboard and the explorer. Screenshots
of every dashboard go to ``artifacts/screenshots/``.

Requirements: Debian's ``chromium`` (``scripts/install_browser.sh``), the ``playwright`` Python package
(its own browser download is never used) and ``voila``. Without them the test skips with the reason,
except under ``CI=true`` where it fails: CI must run it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import browser.chromium
from browser.chromium import chromium_page, image_digest, missing_requirement
from browser.voila_server import VoilaServer

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
PAGE_TIMEOUT_MS = 420_000  # Voila executes the whole notebook before it answers


def require_browser() -> None:
    """Return when the browser test can run; else skip with the reason, or fail under ``CI=true``."""
    reason = missing_requirement()
    if reason is None:
        return
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"CI=true: the browser test must run, but {reason}")
    print(f"\nskipping the browser test: {reason}")
    pytest.skip(reason)


def test_missing_browser_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.setattr(browser.chromium, "find_chromium", lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium not found"):
        require_browser()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_browser()


@pytest.fixture(scope="module")
def voila():
    require_browser()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    env = {"CORRLAB_NB_FAST": "1", "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    server = VoilaServer(ROOT / "notebooks", ROOT / "artifacts" / "voila.log", env=env)
    with server:
        yield server


@pytest.fixture()
def page(tmp_path):
    with chromium_page(tmp_path / "chromium-profile") as p:
        p.set_default_timeout(PAGE_TIMEOUT_MS)
        yield p


def wait_for_change(locator, old: str, timeout_s: float = 300.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        new = image_digest(locator)
        if new != old:
            return new
        time.sleep(1.0)
    raise AssertionError(f"the figure did not change within {timeout_s:.0f} s")


def test_corr_adapter_toggle_and_run_changes_the_figures(voila, page):
    page.goto(voila.url("03_corr_adapter.ipynb"), timeout=PAGE_TIMEOUT_MS)
    panel = page.locator(".corrlab-intervention")
    panel.wait_for(state="visible")
    figure = panel.locator("img.corrlab-before-after")
    metrics = panel.locator("img.corrlab-metrics")
    figure.wait_for(state="visible")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=figure.element_handle())
    assert "Error" not in panel.inner_text(), voila.log_tail()
    panel.screenshot(path=str(SCREENSHOTS / "intervention_panel_plain.png"))
    before, before_metrics = image_digest(figure), image_digest(metrics)

    checkbox = panel.get_by_role("checkbox", name="CorrAdapter")
    checkbox.check()
    assert checkbox.is_checked()
    panel.get_by_role("button", name="Run").click()
    after = wait_for_change(figure, before)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=figure.element_handle())
    assert after != before
    wait_for_change(metrics, before_metrics, timeout_s=120)  # drawn after the images
    panel.locator(".progress-bar-success").wait_for(state="attached", timeout=60_000)
    text = panel.inner_text()
    assert "CorrAdapter eta=" in text and "Error" not in text
    panel.screenshot(path=str(SCREENSHOTS / "intervention_panel_corr_adapter.png"))
    page.screenshot(path=str(SCREENSHOTS / "notebook_03_corr_adapter.png"), full_page=True)


def test_accuracy_dashboard_and_explorer_render(voila, page):
    page.goto(voila.url("02_accuracy_curves.ipynb"), timeout=PAGE_TIMEOUT_MS)
    accuracy = page.locator(".corrlab-accuracy")
    explorer = page.locator(".corrlab-explorer")
    accuracy.wait_for(state="visible")
    explorer.wait_for(state="visible")
    for name in ("heatmap", "curves"):
        img = accuracy.locator(f"img.corrlab-{name}")
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
    for name in ("correspondence", "pair", "baseline", "pca"):
        img = explorer.locator(f"img.corrlab-{name}")
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
    assert "Traceback" not in accuracy.inner_text() and "Error" not in explorer.inner_text()
    accuracy.screenshot(path=str(SCREENSHOTS / "accuracy_dashboard.png"))

    correspondence = explorer.locator("img.corrlab-correspondence")
    old = image_digest(correspondence)
    explorer.get_by_role("combobox", name="source").select_option(label="view 1")
    wait_for_change(correspondence, old, timeout_s=120)
    explorer.screenshot(path=str(SCREENSHOTS / "correspondence_explorer.png"))
