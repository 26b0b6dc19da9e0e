"""Screenshots of `tunelab board` on a real run, for docs/board.md: headless Chromium (Debian's chromium +
chromium-driver) through Selenium, with the browser test's helpers (tests/support/board_browser.py).

    PYTHONPATH=$PWD nice -n 5 tunelab quickstart          # a run in runs/quickstart-<UTC time>
    PYTHONPATH=$PWD python docs/board/shoot.py runs/      # docs/board/{runs,curves,data,evals,chat,launch}.png

The chat prompt is the first held-out item of the run's eval set (data/eval.jsonl), which it never trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2]))  # the checkout, for tests.support
from tests.support.board_browser import chromium, serve  # noqa: E402

HERE = Path(__file__).parent


VIEWS = ("runs", "curves", "data", "evals", "chat", "launch")


def newest_quickstart(runs: Path) -> str:
    """The newest quickstart run that has trained (its adapter/ is written before the after-evaluation)."""
    done = sorted(p for p in runs.glob("quickstart-*") if (p / "adapter").is_dir())
    if not done:
        sys.exit(f"no trained quickstart run (adapter/) in {runs}: run `tunelab quickstart` first")
    return done[-1].name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="?", default=Path("runs"))
    p.add_argument("--run", help="run name under RUNS (default: the newest trained quickstart-*)")
    p.add_argument("--views", default=",".join(VIEWS), help=f"which screenshots (default: all of {','.join(VIEWS)})")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args()
    run = args.run or newest_quickstart(args.runs)
    views = args.views.split(",")
    if "evals" in views and not (args.runs / run / "quickstart.json").is_file():
        print(f"{run} has no quickstart.json yet (the after-evaluation is still running?): no evals.png")
        views.remove("evals")
    prompt = json.loads((args.runs / run / "data" / "eval.jsonl").read_text().splitlines()[0])["prompt"]

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    with serve(args.runs, "--configs", "configs") as url, chromium(1300, 900) as browser:
        css = lambda sel: browser.find_elements(By.CSS_SELECTOR, sel)  # noqa: E731
        wait = lambda s=60: WebDriverWait(browser, s)  # noqa: E731

        def shot(name: str, height: int = 900) -> None:
            if name not in views:
                return
            browser.set_window_size(1300, height)
            path = args.out / f"{name}.png"
            browser.save_screenshot(str(path))
            print(f"{path}: {path.stat().st_size / 1024:.0f} KiB")

        browser.get(url)
        wait().until(lambda d: css(f"tr[data-run='{run}'] a"))
        shot("runs", 500)
        css(f"tr[data-run='{run}'] a")[0].click()
        wait().until(lambda d: "config.yaml" in d.find_element(By.ID, "run-body").text)
        css("a[data-view=curves]")[0].click()
        wait().until(lambda d: css(f"svg[data-metric=loss] polyline[data-run='{run}']"))
        shot("curves", 640)
        if "data" in views:
            css("a[data-view=data]")[0].click()
            wait(600).until(lambda d: len(css(".example")) == 4)  # first use: imports transformers
            shot("data", 1000)
        if "evals" in views:
            css("a[data-view=evals]")[0].click()
            wait().until(lambda d: css(".eval table"))
            shot("evals", 700)
        if "chat" in views:
            css("a[data-view=chat]")[0].click()
            css("#chat-prompt")[0].send_keys(prompt)
            css("#chat-max")[0].clear()
            css("#chat-max")[0].send_keys(str(args.max_new_tokens))
            css("#chat-send")[0].click()
            wait(3600).until(lambda d: css("#chat-status")[0].text == "done")  # loads and runs the model on the CPU
            css("#chat-template-box")[0].click()
            shot("chat", 900)
        if "launch" in views:
            css("a[data-view=launch]")[0].click()
            wait().until(lambda d: css("#launch-config option[value='configs/lora-sft.yaml']"))
            Select(css("#launch-config")[0]).select_by_value("configs/lora-sft.yaml")
            css("#launch-name")[0].send_keys("lora-sft-from-board")
            css("#launch-overrides")[0].send_keys("train.max_steps=20\ntrain.lr=1e-4")
            css("#launch-check")[0].click()
            wait(600).until(lambda d: css("#cost-table"))
            shot("launch", 640)


if __name__ == "__main__":
    main()
