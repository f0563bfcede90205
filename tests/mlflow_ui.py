"""Look at an experiment in the MLflow UI (3.17/3.18) the way a user would: a real headless Chromium
(Debian's package, driven by Playwright for Python) opens the experiment's runs table on a running
`mlflow server`, opens every parent run so its nested runs show under it, and reports what the page
shows.

What the UI does that matters here:
- `#/experiments/<id>` lands on the GenAI overview, not on the runs; `#/experiments/<id>/runs` with
  `workflowType=machine_learning` is the "Model training" runs table.
- Nested runs are listed under their parent, collapsed: each parent row has an expander button in
  its Run Name cell. A fresh browser profile (Playwright makes one per launch) starts with all of
  them closed. Nesting is only shown while the table is sorted by creation time (the default).
- The table (ag-grid) is virtualized: only rows within the viewport (plus a small buffer) are in the
  page, so a very long list of runs will not all be "visible" at once.
- Long run names are cut off with an ellipsis on screen, but the full name is in the page text; match
  on a prefix (e.g. the trial id) when a screenshot is meant to show it too.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# Flags for a closed network and a container: no sandbox (root), no GPU, no calls home, and shared
# memory in /tmp (a container's /dev/shm may be 64 MB; Debian's launcher script does not always
# notice).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
VIEWPORT = {"width": 1920, "height": 1200}
# The expander ("+"/"-") in a parent run's Run Name cell.
EXPANDER = 'button[data-component-id*="runnamecellrenderer"]'


def browser_problem() -> str | None:
    """Why the browser check cannot run here (Chromium or Playwright missing), or None if it can."""
    problems = []
    if not os.access(CHROMIUM, os.X_OK):
        problems.append(f"{CHROMIUM} not found: apt-get update && "
                        "apt-get install -y --no-install-recommends chromium")
    if importlib.util.find_spec("playwright") is None:
        problems.append("Playwright for Python not installed: pip install playwright "
                        "(do not run `playwright install`; the OS Chromium is used)")
    return "; ".join(problems) or None


def open_experiment(uri: str, experiment_id: str, expect: list[str], png: Path,
                    timeout_s: float = 120) -> str:
    """Open experiment `experiment_id`'s runs table on the MLflow server at `uri`, expand every
    parent run, and wait until each string in `expect` is visible on the page (substring match,
    case-insensitive). Saves a screenshot to `png` either way and returns the page's visible text;
    fails with the missing strings and the tail of the page text if they do not all show within
    `timeout_s` (browser start included)."""
    problem = browser_problem()
    assert problem is None, problem
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    deadline = time.monotonic() + timeout_s
    url = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    error = ""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(timeout_s * 1000)
            try:
                page.goto(url, wait_until="domcontentloaded", timeout=_ms_left(deadline))
                page.locator("[role=row][row-id]").first.wait_for(timeout=_ms_left(deadline))
                _expand_parents(page, deadline)
                missing = _wait_visible(page, expect, deadline)
            except PlaywrightError as e:  # timeouts included
                missing, error = list(expect), f"{type(e).__name__}: {str(e).splitlines()[0]}\n"
            png.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(png), full_page=True)
            text = page.inner_text("body")
        finally:
            browser.close()
    assert not missing, (f"MLflow UI at {url} did not show {missing} within {timeout_s:.0f} s\n{error}"
                         f"screenshot: {png}\npage text (tail):\n{text[-2000:]}")
    return text


def _ms_left(deadline: float) -> float:
    """Milliseconds until `deadline` (at least 1: Playwright reads 0 as "no timeout")."""
    return max(1.0, (deadline - time.monotonic()) * 1000)


def _row_count(page) -> int:
    """Rows the runs grid shows (header rows included); ag-grid keeps this whole even when it only
    renders part of them."""
    return int(page.locator("[role=grid][aria-rowcount]").first.get_attribute("aria-rowcount"))


def _expand_parents(page, deadline: float) -> None:
    """Open every parent run (and any parent that shows up once opened) so its children are listed;
    each click must make the table longer (a fresh profile starts with every parent closed)."""
    done: set[str] = set()
    while todo := [r for r in page.locator(f"[role=row][row-id]:has({EXPANDER})").evaluate_all(
            "rows => rows.map(r => r.getAttribute('row-id'))") if r not in done]:
        done.add(todo[0])
        before = _row_count(page)
        page.locator(f'[role=row][row-id="{todo[0]}"] {EXPANDER}').click(timeout=_ms_left(deadline))
        page.wait_for_function(
            "n => Number(document.querySelector('[role=grid][aria-rowcount]')"
            "?.getAttribute('aria-rowcount')) > n", arg=before, timeout=_ms_left(deadline))


def _wait_visible(page, expect: list[str], deadline: float) -> list[str]:
    """Wait until every string in `expect` is in a visible element; return those that never were."""
    missing = list(expect)
    while missing:
        missing = [s for s in missing if not page.get_by_text(s).filter(visible=True).count()]
        if not missing or time.monotonic() > deadline:
            break
        page.wait_for_timeout(250)
    return missing
