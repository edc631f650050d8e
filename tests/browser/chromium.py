"""Headless Debian Chromium driven by Playwright (nothing downloaded: the system browser is used)."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

#: Flags from the integration notes: headless, no sandbox (root in containers), no GPU, and no
#: background traffic (component updates, sync, QUIC) so the test never leaves localhost.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]


def find_chromium() -> str | None:
    """``$CORRLAB_CHROMIUM``, ``/usr/bin/chromium`` or ``chromium`` on PATH; None when there is none."""
    for candidate in (os.environ.get("CORRLAB_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_requirement() -> str | None:
    """Why the browser test cannot run here, or None when it can."""
    if find_chromium() is None:
        return "chromium not found (run scripts/install_browser.sh as root: apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        return f"playwright (Python package) is not installed: {e}"
    from .voila_server import voila_executable

    if voila_executable() is None:
        return "voila is not installed in this environment"
    return None


@contextmanager
def chromium_page(user_data_dir: Path, width: int = 1400, height: int = 2400):
    """A Playwright page in a fresh headless Chromium profile; requests to other hosts than 127.0.0.1
    / localhost are aborted (the test is offline by construction)."""
    from playwright.sync_api import sync_playwright

    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(user_data_dir), executable_path=find_chromium(), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": width, "height": height}, device_scale_factor=1,
        )
        try:
            def local_only(route):
                host = urlparse(route.request.url).hostname
                if host in ("127.0.0.1", "localhost") or route.request.url.startswith(("blob:", "data:")):
                    route.continue_()
                else:
                    route.abort()

            context.route("**/*", local_only)
            page = context.pages[0] if context.pages else context.new_page()
            yield page
        finally:
            context.close()


IMAGE_DIGEST_JS = """
async (img) => {
  const bytes = await (await fetch(img.src)).arrayBuffer();
  const digest = await crypto.subtle.digest("SHA-256", bytes);
  return Array.from(new Uint8Array(digest)).map(b => b.toString(16).padStart(2, "0")).join("");
}
"""


def image_digest(locator) -> str:
    """SHA-256 of the bytes an ``<img>`` element displays (its blob / data URL fetched in the page)."""
    return locator.evaluate(IMAGE_DIGEST_JS)
