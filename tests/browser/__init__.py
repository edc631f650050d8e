"""Helpers of the browser test: a Voila server and a headless Chromium driven by Playwright."""
