"""How fast the report opens: time to first table in headless Chromium, and the site's size on disk.

Builds three sites: the bundled scenes-rn and scenes-vit reports at their default sizes (``nha report``), and a
synthetic RN50x16-sized atlas (48 heads x 3,072 neurons = 147,456 pairs, random words; no leaderboard). Each
site is opened ``--loads`` times from ``file://`` in the system Chromium (a fresh navigation each time); the time
is the wall clock from the navigation's start to the first table in the page, as selenium sees it (an upper
bound: it includes the driver's round trips). For the synthetic atlas the first table is the atlas page's; a
neuron page (one lazily loaded shard) and a search are timed too. Screenshots of the three views of the
scenes-rn report go to ``benchmarks/results/report_{leaderboard,image,unit,search}.png``.

    python benchmarks/report_load.py                     # ~10 min on 2 CPU cores, most of it building the sites
    python benchmarks/report_load.py --loads 7 --work /tmp/report_load

Writes benchmarks/results/report_load.json and .md.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from nha_plugin.files import write_bytes, write_json, write_text
from nha_plugin.report import ReportConfig, build_report, site_size, write_site
from nha_plugin.report.atlas import synthetic_atlas

RESULTS = Path(__file__).resolve().parent / "results"


def _driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    options.binary_location = "/usr/bin/chromium"
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def _time_to(driver, url: str, css: str) -> float:
    """Seconds from starting the navigation to ``url`` until an element matching ``css`` exists."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver.get("about:blank")
    t0 = time.perf_counter()
    driver.get(url)
    WebDriverWait(driver, 30, poll_frequency=0.005).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))
    return time.perf_counter() - t0


def _summary(times) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "loads": len(times)}


def _errors(driver) -> list:
    return [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loads", type=int, default=5, help="loads per site (median, min, max; default 5)")
    ap.add_argument("--work", default=None, help="folder for the sites (default: a temporary folder)")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="report_load_"))
    sites, build_s = {}, {}
    for model in ("scenes-rn", "scenes-vit"):
        t0 = time.perf_counter()
        sites[model] = build_report(ReportConfig(out=str(work / model), model=model))
        build_s[model] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sites["synthetic RN50x16 atlas"] = write_site(work / "rn50x16", None, [], synthetic_atlas(48, 3072, k=5),
                                                  title="synthetic RN50x16 atlas")
    build_s["synthetic RN50x16 atlas"] = time.perf_counter() - t0
    driver = _driver()
    out = {"machine": platform.platform(), "python": sys.version.split()[0], "browser": driver.capabilities.get(
        "browserVersion"), "method": "wall clock from driver.get() to the first matching element (selenium, "
                                     "poll 5 ms), after a navigation to about:blank; file:// URLs", "sites": {},
           "size": "bytes and files of the pages (all but the run/ and atlas-run/ caches kept for reruns: cache_bytes)"}
    try:
        for name, index in sites.items():
            url = index.as_uri()
            first = ("#atlas-heads", url + "#/atlas") if "synthetic" in name else ("#leaderboard", url)
            entry = {"first_table": _summary([_time_to(driver, first[1], first[0]) for _ in range(args.loads)]),
                     "size": site_size(index.parent), "build_s": build_s[name]}
            if "synthetic" in name:
                entry["neuron_page"] = _summary([_time_to(driver, url + "#/unit/neuron:3000", "#unit-pairs")
                                                 for _ in range(args.loads)])
                entry["search_yellow"] = _summary([_time_to(driver, url + "#/search/yellow", "#search-results")
                                                   for _ in range(args.loads)])
            entry["console_errors"] = _errors(driver)
            out["sites"][name] = entry
        rn = sites["scenes-rn"].as_uri()
        for view, (hash_, css) in {"leaderboard": ("", "#leaderboard"), "image": ("#/image/0", "#image-metrics"),
                                   "unit": ("#/unit/neuron:0", "#unit-pairs"),
                                   "search": ("#/search/yellow", "#search-results")}.items():
            _time_to(driver, rn + hash_, css)
            time.sleep(0.5)            # let the canvases draw their images
            write_bytes(RESULTS / f"report_{view}.png", driver.get_screenshot_as_png())
    finally:
        driver.quit()
    write_json(RESULTS / "report_load.json", out)
    lines = ["# Report load times (headless Chromium, file://)", "", f"{out['method']}; {out['browser']}, "
             f"{out['machine']}.", "", "| site | first table median s (min, max) | size MB | files | extra |",
             "|---|---:|---:|---:|---|"]
    for name, e in out["sites"].items():
        ft = e["first_table"]
        extra = "; ".join(f"{k} {e[k]['median_s']:.3f} s" for k in ("neuron_page", "search_yellow") if k in e)
        lines.append(f"| {name} | {ft['median_s']:.3f} ({ft['min_s']:.3f}, {ft['max_s']:.3f}) | "
                     f"{e['size']['bytes'] / 1e6:.1f} | {e['size']['files']} | {extra} |")
    write_text(RESULTS / "report_load.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
