"""`tunelab board` in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by Selenium
against the real server process, on the tiny run of board_fixtures. Screenshots go to $TUNELAB_BOARD_SCREENSHOTS
or the test's temporary folder (the docs' screenshots, of a real quickstart run, come from docs/board/shoot.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.board_browser import CHROMIUM, DRIVER, chromium, serve
from tests.support.board_fixtures import board_runs, copy_run  # noqa: F401

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Chromium is not installed: apt-get install -y chromium "
                       "chromium-driver (Debian) for the browser test"),
]
REPO = Path(__file__).parents[2]


@pytest.fixture()
def server(board_runs):  # noqa: F811
    """The real `tunelab board` process on a free port; yields the URL it prints (with its ?token=)."""
    with serve(board_runs, "--configs", str(board_runs.parent)) as url:  # tiny.yaml, for the launch form
        yield url


@pytest.fixture()
def browser():
    with chromium() as driver:
        yield driver


def test_board_in_chromium(server, browser, board_runs, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    shots = Path(os.environ.get("TUNELAB_BOARD_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    wait = lambda s=20: WebDriverWait(browser, s)  # noqa: E731
    css = lambda sel: browser.find_elements(By.CSS_SELECTOR, sel)  # noqa: E731
    # a run that is still writing: two records so far, its status says running (this process is alive)
    live = copy_run(board_runs, "tiny", "live")
    records = (live / "metrics.jsonl").read_text().splitlines()
    (live / "metrics.jsonl").write_text("\n".join(records[:2]) + "\n")
    (live / "summary.json").unlink()
    st = json.loads((live / "status.json").read_text()) | {"state": "running", "pid": os.getpid()}
    (live / "status.json").write_text(json.dumps(st))

    # the runs table
    browser.get(server)
    wait().until(lambda d: len(css("#runs-table tr[data-run]")) == 2)
    status = {r.get_attribute("data-run"): r.find_elements(By.CSS_SELECTOR, "td")[-1].text for r in css("#runs-table tr[data-run]")}
    assert status == {"tiny": "finished", "live": "running"}
    css("#filter")[0].send_keys("live")
    assert [r.get_attribute("data-run") for r in css("#runs-table tr[data-run]")] == ["live"]
    browser.save_screenshot(str(shots / "runs.png"))

    # a curve that grows while the run writes
    css("tr[data-run=live] a")[0].click()
    wait().until(lambda d: "config.yaml" in d.find_element(By.ID, "run-body").text)
    css("a[data-view=curves]")[0].click()
    points = lambda: [int(p.get_attribute("data-points")) for p in css("svg[data-metric=loss] polyline[data-run=live]")]  # noqa: E731
    try:
        wait().until(lambda d: points() == [2])
    except Exception:
        browser.save_screenshot(str(shots / "failed-curves.png"))
        raise AssertionError(f"loss curve points {points()}; page: {css('#view-curves')[0].text[:300]}") from None
    with open(live / "metrics.jsonl", "a") as f:
        f.write("\n".join(records[2:5]) + "\n")
    wait().until(lambda d: points() == [5])
    browser.save_screenshot(str(shots / "curves.png"))

    # the token-mask view: one highlighted token per label the trainer trains on
    css("a[data-view=runs]")[0].click()
    css("#filter")[0].send_keys(*[Keys.BACKSPACE] * 4)  # typed keys fire the filter's input event (clear() does not)
    wait().until(lambda d: len(css("tr[data-run=tiny] a")) == 1)
    css("tr[data-run=tiny] a")[0].click()
    css("a[data-view=data]")[0].click()
    wait(180).until(lambda d: len(css(".example")) == 4)  # first use: imports transformers
    import numpy as np

    labels = np.load(board_runs / "tiny" / "prepared" / "train-00000.labels.npy")
    offsets = np.load(board_runs / "tiny" / "prepared" / "train-00000.offsets.npy")
    assert len(css(".example[data-row='0'] .tok.trained")) == int((labels[offsets[0]:offsets[1]] != -100).sum())
    assert css("#mixture")[0].text.count("1.000") == 2  # one source: planned and realised share 1
    browser.save_screenshot(str(shots / "data.png"))

    # the chat panel: both sides answer the same prompt, streamed
    css("a[data-view=chat]")[0].click()
    css("#chat-prompt")[0].send_keys("Reverse: alpha beta gamma")
    css("#chat-max")[0].clear()
    css("#chat-max")[0].send_keys("12")
    css("#chat-send")[0].click()
    wait(180).until(lambda d: css("#chat-tuned")[0].get_attribute("data-done") == "1")
    wait().until(lambda d: "<|im_start|>assistant" in css("#chat-prompt-text")[0].get_attribute("textContent"))
    assert css("#chat-base")[0].text and css("#chat-tuned")[0].text
    assert css("#chat-status")[0].text == "done"
    css("#chat-template-box")[0].click()
    browser.save_screenshot(str(shots / "chat.png"))

    # launch: the tiny run's config with an override, `tunelab cost`'s estimate, then the new run in the table
    from selenium.webdriver.support.ui import Select

    css("a[data-view=launch]")[0].click()
    wait().until(lambda d: len(css("#launch-config option")) >= 2)
    Select(css("#launch-config")[0]).select_by_value(str((board_runs.parent / "tiny.yaml").resolve()))
    css("#launch-name")[0].send_keys("from-board")
    css("#launch-overrides")[0].send_keys("train.max_steps=2")
    css("#launch-check")[0].click()
    wait(180).until(lambda d: css("#cost-table") and css("#launch-go")[0].is_enabled())
    assert "lora" in css("#cost-table")[0].text
    browser.save_screenshot(str(shots / "launch.png"))
    css("#launch-go")[0].click()
    wait().until(lambda d: "started from-board" in css("#launch-status")[0].text)
    job = "const r = document.querySelector('tr[data-job=\"from-board\"]'); return r ? r.textContent : ''"
    wait(180).until(lambda d: "finished" in d.execute_script(job))  # the jobs table is redrawn every 2 s
    css("a[data-view=runs]")[0].click()
    wait().until(lambda d: css("tr[data-run=from-board]"))
    assert css("tr[data-run=from-board] td")[-1].text == "finished"
    assert css("tr[data-run=from-board] td")[5].text == "2 / 2"
