"""The real board process and a headless Chromium (Debian's chromium + chromium-driver, driven by Selenium), for
tests/test_board_browser.py and docs/board/shoot.py (the docs' screenshots of a real quickstart run)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
REPO = Path(__file__).parents[2]


@contextmanager
def serve(runs: Path, *args: str):
    """`tunelab board RUNS --port 0 ARGS` (this checkout's tunelab); yields the URL it prints (with ?token=)."""
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "board", str(runs), "--port", "0", *args],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = proc.stdout.readline()
        assert "serving" in line, line
        yield line.split(" on ")[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def chromium(width: int = 1300, height: int = 900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
