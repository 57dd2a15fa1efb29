"""The report in a real browser: the system's headless Chromium (Debian ``chromium`` and ``chromium-driver``)
driven by selenium loads the site from ``file://``; the numbers on the page are checked against the run's
records and a zero-shot classifier evaluated here, and the console must stay free of errors."""
import json

import numpy as np
import pytest
import torch
from conftest import tiny_report_inputs
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from nha_plugin.report import drilldown, leaderboard, read_run, write_site

EVIL = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A site of the tiny run whose first image's class is named ``<script>alert(1)</script>``."""
    inputs = tiny_report_inputs()
    folder = tmp_path_factory.mktemp("site")
    run = read_run(inputs["run"])
    images = drilldown(run, folder, progress=False)
    images[0]["label"] = EVIL
    from nha_plugin.report.pictures import write_png
    paths = [f"atlas-img/{i}.png" for i in range(len(inputs["thumbs"]))]
    for p, t in zip(paths, inputs["thumbs"]):
        write_png(folder / p, t)
    index = write_site(folder, leaderboard(run), images, inputs["atlas"], title="tiny", block=64,
                       atlas_images=paths)
    return {"index": index, "run": run, "images": images, "atlas": inputs["atlas"], "inputs": inputs}


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.binary_location = "/usr/bin/chromium"
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    yield driver
    driver.quit()


def _open(browser, site, hash_, element_id):
    browser.get(site["index"].as_uri() + hash_)
    return WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, element_id))[0]


def _no_console_errors(browser):
    severe = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert severe == []


def _means(site, key):
    """Mean of ``key`` over each method's records, computed here from the JSON lines."""
    out = {}
    for m in site["run"]["records"]:
        lines = (site["inputs"]["run"] / f"{m}.records.jsonl").read_text().splitlines()
        vals = [json.loads(line)[key] for line in lines if key in json.loads(line)]
        if vals:
            out[m] = float(np.mean(vals))
    return out


def test_leaderboard_shows_the_records_means_and_sorts(browser, site):
    table = _open(browser, site, "", "leaderboard")
    means = _means(site, "mass_in_mask")
    cells = table.find_elements(By.CSS_SELECTOR, "td[data-key=mass_in_mask]")
    shown = {c.find_element(By.XPATH, "..").get_attribute("data-method"): float(c.get_attribute("data-mean"))
             for c in cells}
    assert shown == pytest.approx(means, rel=1e-9)
    assert "paired percentile bootstrap" in browser.find_element(By.ID, "tests").text
    browser.find_element(By.CSS_SELECTOR, "th[data-key=mass_in_mask]").click()       # higher is better: largest first
    rows = browser.find_elements(By.CSS_SELECTOR, "#leaderboard tr[data-method]")
    assert [r.get_attribute("data-method") for r in rows] == sorted(means, key=lambda m: -means[m])
    browser.find_element(By.CSS_SELECTOR, "th[data-key=mass_in_mask]").click()
    rows = browser.find_elements(By.CSS_SELECTOR, "#leaderboard tr[data-method]")
    assert [r.get_attribute("data-method") for r in rows] == sorted(means, key=lambda m: means[m])
    _no_console_errors(browser)


def test_image_view_shows_class_probability_maps_and_metrics_escaped(browser, site):
    _open(browser, site, "", "images").find_elements(By.TAG_NAME, "a")[0].click()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "image-view"))
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    assert browser.find_element(By.ID, "image-class").text == EVIL
    from nha_plugin.harness.data import items_to_tensor, load_benchmark_data
    from nha_plugin.readout import ZeroShotClassifier
    cfg, inputs = site["run"]["config"], site["inputs"]
    items, classes, _ = load_benchmark_data("scenes", 2, cfg["seed"])
    with torch.no_grad():
        logits = ZeroShotClassifier(inputs["model"], inputs["tokenizer"], classes, templates=("a photo of a {}.",))(
            items_to_tensor(items[:1]))
    p = float(torch.softmax(logits.double(), -1)[0, classes.index(items[0].label)])
    assert float(browser.find_element(By.ID, "image-prob").text) == pytest.approx(p, abs=5e-4)
    figures = browser.find_elements(By.CSS_SELECTOR, "figure[data-method]")
    assert sorted(f.get_attribute("data-method") for f in figures) == sorted(site["run"]["records"])
    record = json.loads((inputs["run"] / "nad_spatial.records.jsonl").read_text().splitlines()[0])
    cell = browser.find_element(By.CSS_SELECTOR, "#image-metrics tr[data-method=nad_spatial] td[data-key=mass_in_mask]")
    assert float(cell.text) == pytest.approx(record["mass_in_mask"], abs=5e-4)
    _no_console_errors(browser)


def test_atlas_unit_and_search(browser, site):
    atlas = site["atlas"]
    table = _open(browser, site, "#/atlas", "atlas-neurons")
    first = table.find_elements(By.CSS_SELECTOR, "tr[data-unit]")[0]
    top = max(atlas["neurons"], key=lambda u: u["importance"])
    assert first.get_attribute("data-unit") == top["id"]
    first.find_element(By.TAG_NAME, "a").click()
    words = WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "unit-words"))[0]
    rows = [r.find_elements(By.TAG_NAME, "td") for r in words.find_elements(By.TAG_NAME, "tr")[1:]]
    assert [r[0].text for r in rows] == [w for w, _ in top["words"]]
    assert [float(r[1].text) for r in rows] == pytest.approx([c for _, c in top["words"]], abs=5.01e-4)   # shown to 3 decimals
    pairs = browser.find_elements(By.CSS_SELECTOR, "#unit-pairs tr[data-unit]")
    expected = sorted((p for p in atlas["pairs"] if p["neuron"] == top["neuron"]), key=lambda p: -p["importance"])
    assert [r.get_attribute("data-unit") for r in pairs] == [p["id"] for p in expected]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#unit-top canvas")) == len(top["top"])
    box = browser.find_element(By.ID, "search")
    box.clear()
    box.send_keys("yellow", Keys.ENTER)
    title = WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "search-title"))[0]
    hits = sum(w.lower().startswith("yellow") for u in atlas["heads"] + atlas["neurons"] + atlas["pairs"]
               for w, _ in u["words"])
    assert hits > 0 and title.text.startswith(f"{hits} units say")
    _no_console_errors(browser)
