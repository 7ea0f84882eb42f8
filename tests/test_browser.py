"""The HTML report's slice and example browsers, driven in headless Chromium (Debian's `chromium` and
`chromium-driver` through Selenium): what each control shows is checked against the run's own Parquet tables,
and no page may log to the console, make a request other than its own file and inline data, or run a script
smuggled in through labels or metadata."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from html import unescape
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from synthetic_run import build, build_review
from xaudit.tasks import browser
from xaudit.tasks.report import render_report, render_review

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
REQUIRED = os.environ.get("XAUDIT_REQUIRE_BROWSER") == "1"      # .ci/run installs the browser and sets this


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed"
    if not CHROMIUM or not DRIVER:
        return "Debian's chromium and chromium-driver are not installed"
    return None


@pytest.fixture(scope="module")
def chrome():
    why = _missing()
    if why:
        if REQUIRED:
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1600",
              "--disable-background-networking", "--no-first-run", "--disable-extensions"):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    service = Service(DRIVER)
    driver = webdriver.Chrome(service=service, options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        pid = getattr(service.process, "pid", None)
        if pid and service.process.poll() is None:      # stopped by its process id if quit() left it running
            os.kill(pid, 9)


def open_report(driver, path: Path):
    """Load `path`, drain the logs of anything earlier, and return the driver."""
    driver.get("about:blank")
    driver.get_log("browser")
    driver.get_log("performance")
    driver.get(path.as_uri())
    return driver


def requests_made(driver) -> set[str]:
    """Every URL the page asked for (Chrome's network log: requestWillBeSent, data: URLs included)."""
    urls = set()
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated", "Network.eventSourceMessageReceived"):
            urls.add(msg["params"].get("request", {}).get("url") or msg["params"].get("url", ""))
    return urls


def assert_quiet_and_offline(driver, path: Path):
    logs = driver.get_log("browser")
    assert not logs, f"console messages: {logs}"
    foreign = {u for u in requests_made(driver) if not u.startswith("data:") and u != path.as_uri()}
    assert not foreign, f"the report asked for {foreign}"


def by_id(driver, i):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, i)


def choose(driver, i, value):
    from selenium.webdriver.support.ui import Select
    Select(by_id(driver, i)).select_by_value(value)


def table_slices(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#sb-table tbody tr')).map(r => r.dataset.slice)")


def chart_slices(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#sb-svg g.bar')).map(g => g.dataset.slice)")


def label(key, value):
    return "overall" if key == "overall" else f"{key}={value}"


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    run = build(tmp_path_factory.mktemp("browse") / "golden-run")
    return Path(render_report(run, ("html",))["html"]), run


def test_slice_browser_follows_the_chosen_metric_sort_and_filter_and_opens_a_slice(chrome, audit):
    path, run = audit
    d = open_report(chrome, path)
    metrics = pq.read_table(run / "metrics.parquet").to_pandas()
    scalar = metrics[(metrics.sub_key == "") & (metrics.metric != "confusion")]
    assert by_id(d, "browse").is_displayed()

    # the default metric, ascending by value: chart and table in the order of metrics.parquet's values
    acc = scalar[scalar.metric == "accuracy"].sort_values("value", kind="stable")
    assert chart_slices(d) == table_slices(d) == [label(k, v) for k, v in zip(acc.slice_key, acc.slice_value)]
    assert "≥ 0.950 (fail)" in by_id(d, "sb-svg").text                  # the threshold line and its bound

    # another metric, descending: the chart follows, and its warn threshold is drawn as a warning
    choose(d, "sb-metric", "gradcam.roi_mass")
    choose(d, "sb-order", "desc")
    roi = scalar[scalar.metric == "gradcam.roi_mass"].sort_values("value", ascending=False, kind="stable")
    assert chart_slices(d) == [label(k, v) for k, v in zip(roi.slice_key, roi.slice_value)]
    assert by_id(d, "sb-svg").get_attribute("aria-label") == "gradcam.roi_mass per slice"
    assert d.execute_script("return document.querySelectorAll('#sb-svg line.threshold.warn').length") == 1

    # by interval width, then by n
    choose(d, "sb-sort", "width")
    width = roi.assign(w=roi.ci_high - roi.ci_low).sort_values("w", ascending=False, kind="stable")
    assert table_slices(d) == [label(k, v) for k, v in zip(width.slice_key, width.slice_value)]
    choose(d, "sb-sort", "n")
    ns = [int(x) for x in d.execute_script(
        "return Array.from(document.querySelectorAll('#sb-table tbody tr td:nth-child(2)')).map(c => c.textContent)")]
    assert ns == sorted(ns, reverse=True)

    # filter: the 'site' slices with n >= 20 only
    choose(d, "sb-key", "site")
    box = by_id(d, "sb-minn")
    box.clear()
    box.send_keys("20")
    sizes = scalar[scalar.metric == "accuracy"].set_index(["slice_key", "slice_value"]).n
    expect = {label(k, v) for (k, v), n in sizes.items() if k == "site" and n >= 20}
    assert set(table_slices(d)) == expect and expect
    assert by_id(d, "sb-count").text.startswith(f"{len(expect)} of {len(sizes)} slices shown")

    # a click on a bar opens the slice: every metric it has and every check made on it
    target = sorted(expect)[0]
    d.execute_script("document.querySelector(`#sb-svg g.bar[data-slice='${arguments[0]}']`)"
                     ".dispatchEvent(new MouseEvent('click', {bubbles: true}))", target)
    detail = by_id(d, "sb-detail")
    assert detail.is_displayed() and detail.text.startswith(target)
    key, value = target.split("=", 1)
    own = scalar[(scalar.slice_key == key) & (scalar.slice_value == value)]
    rows = d.execute_script("return Array.from(document.querySelectorAll('#sb-detail-metrics tbody tr td:first-child'))"
                            ".map(c => c.textContent)")
    assert rows == sorted(own.metric)
    checks = [c for c in json.loads((run / "validation.json").read_text())["checks"]
              if (c["slice_key"], c["slice_value"]) == (key, value)]
    shown = d.execute_script("return Array.from(document.querySelectorAll('#sb-detail-checks tbody tr'))"
                             ".map(r => r.children[0].textContent + '|' + r.children[1].textContent)")
    assert shown == [f"{c['status']}|{c['metric']}" for c in checks]

    # and shows its examples: the example browser filtered to exactly the slice's rows
    by_id(d, "sb-show-examples").click()
    pred = pq.read_table(run / "predictions.parquet").to_pandas()
    expect = set(pred.example_id[pred[key] == value])
    seen = []
    while True:
        seen += d.execute_script("return Array.from(document.querySelectorAll('#eb-grid .eb-card')).map(c => c.dataset.example)")
        if not by_id(d, "eb-next").is_enabled():
            break
        by_id(d, "eb-next").click()
    assert set(seen) == expect and len(seen) == len(expect) == sizes[(key, value)]
    assert by_id(d, f"eb-slice:{key}").get_attribute("value") == value
    assert_quiet_and_offline(d, path)


def test_example_browser_filters_pages_enlarges_and_the_slider_sets_the_maps_opacity(chrome, audit):
    path, run = audit
    d = open_report(chrome, path)
    pred = pq.read_table(run / "predictions.parquet").to_pandas()
    assert by_id(d, "eb-embedded").text == f"All {len(pred)} scored examples are embedded."

    def cards():
        return d.execute_script("return Array.from(document.querySelectorAll('#eb-grid .eb-card')).map(c => c.dataset.example)")
    first = cards()
    assert len(first) == 8
    by_id(d, "eb-next").click()
    second = cards()
    assert len(second) == 8 and not set(first) & set(second)
    assert by_id(d, "eb-page").text.startswith("page 2 of 8")

    # filters: misclassified examples of one site, exactly those of predictions.parquet
    choose(d, "eb-outcome", "misclassified")
    choose(d, "eb-slice:site", "south")
    expect = pred[~pred.correct & (pred.site == "south")].example_id
    seen = []
    while True:
        seen += cards()
        if not by_id(d, "eb-next").is_enabled():
            break
        by_id(d, "eb-next").click()
    assert sorted(seen) == sorted(expect) and len(seen) > 0
    assert d.execute_script("return Array.from(document.querySelectorAll('#eb-grid .eb-card')).every(c => c.classList.contains('wrong'))")
    # every card shows the input and one map per method
    n_methods = pq.read_table(run / "explanations.parquet").column("method").unique().to_pylist()
    assert d.execute_script("return document.querySelector('#eb-grid .eb-card').querySelectorAll('img.overlay').length") == len(n_methods)

    # the slider sets every overlay's opacity
    slider = by_id(d, "eb-opacity")
    d.execute_script("arguments[0].value = 25; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert by_id(d, "eb-opacity-value").text == "25%"
    assert set(d.execute_script("return Array.from(document.querySelectorAll('#eb-grid img.overlay')).map(i => i.style.opacity)")) == {"0.25"}

    # a click on a map enlarges it; Escape closes it
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    d.find_elements(By.CSS_SELECTOR, "#eb-grid figure")[1].click()
    lightbox = by_id(d, "eb-lightbox")
    assert lightbox.is_displayed()
    big = d.execute_script("return document.querySelector('#eb-lightbox .stack').getBoundingClientRect().width")
    small = d.execute_script("return document.querySelector('#eb-grid .stack').getBoundingClientRect().width")
    assert big >= 3 * small
    d.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    assert not lightbox.is_displayed()
    assert_quiet_and_offline(d, path)


HOSTILE_CLASSES = ["</script><script>window.__pwned = 1</script>", "javascript:window.__pwned = 2",
                   "<img src=x onerror=\"window.__pwned = 3\">"]
HOSTILE_SITES = ["north", "south", "\"><svg onload=window.__pwned=4>&lt;!--<!--"]


def test_hostile_labels_and_metadata_are_shown_as_text_run_nothing_and_fetch_nothing(chrome, tmp_path):
    run = build(tmp_path / "hostile-run", classes=HOSTILE_CLASSES, site_names=HOSTILE_SITES)
    path = Path(render_report(run, ("html",))["html"])
    html = path.read_text()
    data = html.split('<script type="application/json" id="xaudit-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in data and json.loads(data)["examples"]["total"] == 60       # nothing can close the block
    d = open_report(chrome, path)
    # use every control so that every hostile string is put on the page
    from selenium.webdriver.support.ui import Select
    for sid in ("eb-label", "eb-prediction", "eb-slice:site"):
        for v in [o.get_attribute("value") for o in Select(by_id(d, sid)).options]:
            choose(d, sid, v)
        choose(d, sid, "")
    for m in [o.get_attribute("value") for o in Select(by_id(d, "sb-metric")).options]:
        choose(d, "sb-metric", m)
    d.execute_script("document.querySelectorAll('#sb-table button.link').forEach(b => b.click())")
    d.execute_script("document.querySelectorAll('#eb-grid figure').forEach(f => f.click())")
    text = d.find_element("tag name", "body").text
    assert HOSTILE_CLASSES[0] in text and HOSTILE_CLASSES[2] in text and "svg onload" in text
    assert d.execute_script("return window.__pwned === undefined")
    assert d.execute_script("return document.querySelectorAll('svg[onload], img[onerror], a[href^=javascript]').length") == 0
    assert_quiet_and_offline(d, path)


def test_without_javascript_the_report_reads_as_the_static_one(tmp_path, audit):
    """No script runs in the PDF (PDF/A forbids it) and a reader with JavaScript off sees the static report:
    the browser section is `hidden` until the script shows it, and the PDF's document has no script at all."""
    path, run = audit
    html = path.read_text()
    assert re.search(r'<section id="browse" class="browse" hidden></section>', html)
    script = browser.script()
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', html).group(1))
    assert policy.endswith(f"; script-src 'sha256-{digest}'") and "default-src 'none'" in policy
    assert f"<script>{script}</script>" in html
    assert html.count("<script") == 2                      # the data block and the one admitted script
    from xaudit.tasks.report import _documents, report_context
    pdf_html = _documents("report.html.j2", report_context(run), ("pdf",))["pdf"]
    assert "<script" not in pdf_html and "script-src" not in pdf_html and 'id="browse"' not in pdf_html


def test_a_tampered_script_is_refused_by_the_policy(chrome, audit, tmp_path):
    """The CSP admits the report's script by its hash: an edited copy of the file runs nothing (and says so)."""
    path, _ = audit
    bad = tmp_path / "tampered.html"
    bad.write_text(path.read_text().replace("root.hidden = false;", "root.hidden = false; window.__edited = 1;", 1))
    d = open_report(chrome, bad)
    assert d.execute_script("return window.__edited === undefined")
    assert not by_id(d, "browse").is_displayed()
    logs = d.get_log("browser")
    assert any("Content Security Policy" in e["message"] for e in logs)


def test_review_browser_shows_deltas_flips_and_both_models_maps(chrome, tmp_path):
    rd = build_review(tmp_path / "golden-review")
    path = Path(render_review(rd, ("html",))["html"])
    d = open_report(chrome, path)
    table = pq.read_table(rd / "review_metrics.parquet").to_pandas()
    examples = pq.read_table(rd / "review_examples.parquet").to_pandas()
    # the first failing check's metric is shown first, with its gate drawn at the delta it gated on
    assert by_id(d, "sb-svg").get_attribute("aria-label") == "delta.accuracy per slice"
    assert "≥ -0.020 (fail)" in by_id(d, "sb-svg").text
    delta = table[(table.metric == "delta.accuracy") & (table.sub_key == "")].sort_values("value", kind="stable")
    assert table_slices(d) == [label(k, v) for k, v in zip(delta.slice_key, delta.slice_value)]
    cells = d.execute_script("return Array.from(document.querySelector('#sb-table tbody tr').children).map(c => c.textContent)")
    first = delta.iloc[0]
    assert cells[4:6] == [f"{first.baseline:.3f}", f"{first.candidate:.3f}"]
    # flips: exactly the examples that flipped to wrong, each with the baseline's and candidate's map per method
    choose(d, "eb-flip", "to wrong")
    seen = d.execute_script("return Array.from(document.querySelectorAll('#eb-grid .eb-card')).map(c => c.dataset.example)")
    expect = examples.example_id[examples.flip_to_wrong].tolist()
    assert sorted(seen) == sorted(expect)[:8] or (len(expect) > 8 and len(seen) == 8)
    captions = d.execute_script("return Array.from(document.querySelector('#eb-grid .eb-card').querySelectorAll('figcaption')).map(c => c.textContent)")
    assert [c.split(" · ")[:2] for c in captions[1:]] == [["gradcam", "baseline"], ["gradcam", "candidate"],
                                                          ["saliency", "baseline"], ["saliency", "candidate"]]
    assert_quiet_and_offline(d, path)


def test_embedded_data_is_bounded_and_says_how_many(tmp_path):
    """A 2,000-example audit embeds the report's own examples and a fixed sample, within the byte budget,
    and the page says how many of how many; the same sample on every rendering."""
    run = build(tmp_path / "big", n=2000)
    a = Path(render_report(run, ("html",))["html"]).read_text()
    data = json.loads(a.split('id="xaudit-data">', 1)[1].split("</script>", 1)[0])
    ex = data["examples"]
    assert ex["total"] == 2000 and ex["embedded"] == len(ex["rows"]) <= browser.SAMPLE_EXAMPLES + 16
    assert re.match(rf"{ex['embedded']} of the 2000 scored examples are embedded: the \d+ the report shows", ex["note"])
    assert len(a.encode()) < 5_000_000
    assert Path(render_report(run, ("html",))["html"]).read_text() == a


def test_json_block_cannot_be_closed_by_the_data():
    text = browser.embed_json({"a": "</script><!-- & \u2028", "b": float("nan"), "c": [1.0, float("inf")]})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"a": "</script><!-- & \u2028", "b": None, "c": [1.0, None]}


def test_a_check_on_a_slice_without_metric_rows_is_listed_with_its_statistic(audit):
    """The shortcut scan gates class × slice cells that metrics.parquet has no row for; the slice browser
    still lists them (their statistic, interval and n from the check) and opens on the failing metric."""
    _, run = audit
    metrics = pq.read_table(run / "metrics.parquet").to_pandas()
    scalar = metrics[(metrics.sub_key == "") & (metrics.metric != "confusion")]
    check = dict(slice_key="class&site", slice_value="7&A", metric="saliency.hotspot_lift", sub_key="", kind="hotspot",
                 gate_on="interval", value=4.2, ci_low=3.1, ci_high=5.0, bound=2.0, severity="fail", status="FAIL",
                 message="saliency.hotspot_lift on class&site=7&A is 4.2 (95% CI [3.1, 5], n=37); required <= 2: fail")
    rows = browser.slice_rows(scalar, [check])
    row = next(r for r in rows if r["key"] == "class&site")
    assert row["n"] == 37 and row["m"] == {"saliency.hotspot_lift": [4.2, 3.1, 5.0]} and row["checks"][0]["status"] == "FAIL"
    assert len(rows) == len(scalar.groupby(["slice_key", "slice_value"])) + 1
    names = browser.metric_names(scalar, [check])
    assert "saliency.hotspot_lift" in names and browser.default_metric([check], names, "accuracy") == "saliency.hotspot_lift"
    assert browser.default_metric([], names, "accuracy") == "accuracy"


def test_a_gallery_image_enlarges_on_click_and_carries_the_pixels_to_show_enlarged(chrome, tmp_path):
    """The static gallery (the printed one): a click on an input or an overlay enlarges it over the page, a click
    elsewhere puts it back; its pixels are twice the card's size, so the enlarged image is not a blur of a
    thumbnail."""
    import io

    from PIL import Image
    from selenium.webdriver.common.by import By
    run = build(tmp_path / "golden-run", colour=64)
    path = Path(render_report(run, ("html",))["html"])
    d = open_report(chrome, path)
    img = d.find_elements(By.CSS_SELECTOR, ".gallery .card img.zoom")[1]
    d.execute_script("arguments[0].scrollIntoView()", img)
    width = "return arguments[0].getBoundingClientRect().width"
    small = d.execute_script(width, img)
    img.click()
    big = d.execute_script(width, img)
    assert big >= 4 * small, (small, big)
    d.find_element(By.TAG_NAME, "h1").click()
    assert d.execute_script(width, img) == small
    data = base64.b64decode(img.get_attribute("src").split(",", 1)[1])
    assert Image.open(io.BytesIO(data)).size[0] >= 2 * small
    assert_quiet_and_offline(d, path)
