"""Open a report.html in headless Chromium: screenshot its first 1400x900 viewport and measure the page.

Run: .venv/bin/python tools/screenshot_report.py qrobust-report/report.html [--png report.png]

Prints one JSON line: bytes, page height (px), y of the first failing or expected-failure case, table
rows, and the network requests the page made (there should be none). With ``--check`` it exits 1 unless
the page meets issue 19's targets: at most 1.5 MB, no network request, and the first failing (or caught)
case starting inside the first 1400x900 viewport; ``.ci/run`` checks the make-suite report so. Uses Debian's chromium (or
$QROBUST_CHROMIUM) through Playwright, with the flags that keep Chromium itself off the network.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

VIEWPORT = {"width": 1400, "height": 900}
MAX_BYTES = 1_500_000
# without the background-networking flags Chromium contacts Google hosts on its own
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FIRST_BAD = ".card.fail, .card.inconclusive, tr.fail, tr.inconclusive, tr.xfail"


def chromium() -> str | None:
    """The Chromium executable: $QROBUST_CHROMIUM, else chromium on the PATH."""
    return os.environ.get("QROBUST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def launch(playwright):
    return playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)


def open_page(browser, path: Path):
    """A page at the 1400x900 viewport showing ``path``, and the list of non-local URLs it requested."""
    page = browser.new_page(viewport=VIEWPORT)
    network: list[str] = []
    page.on("request", lambda r: network.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
    page.goto(Path(path).resolve().as_uri())
    return page, network


def measure(page, network: list[str], path: Path) -> dict:
    first = page.locator(FIRST_BAD).first
    box = first.bounding_box() if first.count() else None
    return {"bytes": Path(path).stat().st_size, "height_px": page.evaluate("document.documentElement.scrollHeight"),
            "first_bad_y_px": None if box is None else round(box["y"]),
            "table_rows": page.locator("tr").count(), "network_requests": network}


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--png", type=Path, help="where to save the first viewport's screenshot")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the page meets the targets")
    args = parser.parse_args()
    with sync_playwright() as p:
        browser = launch(p)
        page, network = open_page(browser, args.report)
        if args.png:
            page.screenshot(path=str(args.png))
        found = measure(page, network, args.report)
        browser.close()
    print(json.dumps(found))
    if args.check:
        missed = [why for why, bad in (
            (f"{found['bytes']} bytes > {MAX_BYTES}", found["bytes"] > MAX_BYTES),
            (f"network requests {found['network_requests']}", bool(found["network_requests"])),
            (f"first failing case at y = {found['first_bad_y_px']} px, below the first viewport",
             found["first_bad_y_px"] is not None and found["first_bad_y_px"] >= VIEWPORT["height"])) if bad]
        if missed:
            raise SystemExit(f"{args.report}: " + "; ".join(missed))


if __name__ == "__main__":
    main()
