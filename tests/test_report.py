"""Reports: golden HTML, PDF pages/text/attachments, hostile content shown as text and never fetched."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from synthetic_run import build, build_review
from xaudit.tasks.report import DataOnlyFetcher, render_html, render_pdf, render_report, render_review

GOLDEN = Path(__file__).parent / "golden" / "report.html"
GOLDEN_REVIEW = Path(__file__).parent / "golden" / "review.html"
HOSTILE_LABEL = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build(tmp_path_factory.mktemp("run") / "golden-run")


def test_html_matches_reviewed_golden_file(run_dir):
    html = render_html(run_dir)
    if os.environ.get("XAUDIT_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(html)
    assert html == GOLDEN.read_text(), "report HTML changed: review it, then XAUDIT_UPDATE_GOLDEN=1 pytest ..."


def test_html_is_self_contained_and_escapes_data(run_dir):
    html = render_html(run_dir)
    # nothing external: every src/href is inline data, and a CSP forbids anything else
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and all(r.startswith("data:") for r in refs)
    assert "default-src 'none'" in html
    assert HOSTILE_LABEL not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<b>not a PNG</b>" not in html and "&lt;b&gt;not a PNG&lt;/b&gt;" in html
    assert "file:///etc/passwd" in html            # shown as text...
    assert 'src="file:' not in html and 'href="file:' not in html   # ...never as a reference
    for section in ("Checks that did not pass", "What was audited", "Results per slice", "Explanations",
                    "Method", "Limitations and rejected inputs", "Sign-off", "Reproducibility appendix"):
        assert section in html


def test_pdf_pages_text_and_attachments(run_dir, tmp_path):
    if not shutil.which("pdftotext"):
        pytest.skip("poppler-utils (pdftotext, pdfdetach) not installed")
    out = render_report(run_dir, ("pdf",))
    pdf = Path(out["pdf"])
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True).stdout
    pages = int(re.search(r"Pages:\s+(\d+)", info).group(1))
    assert 4 <= pages <= 12
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    first = text.split("\f")[0]
    assert "FAIL" in first and "Pets classifier audit" in first          # verdict on the first page
    assert HOSTILE_LABEL in text and "file:///etc/passwd" in text        # shown as text
    assert re.search(r"page 1 of \d+", text) and "golden-run" in text    # header and footer
    listing = subprocess.run(["pdfdetach", "-list", str(pdf)], capture_output=True, text=True, check=True).stdout
    assert {"metrics.parquet", "validation.json", "manifest.json"} <= set(re.findall(r"\d+: (\S+)", listing))
    subprocess.run(["pdfdetach", "-saveall", "-o", str(tmp_path), str(pdf)], check=True)
    for name in ("metrics.parquet", "validation.json", "manifest.json"):
        assert (tmp_path / name).read_bytes() == (run_dir / name).read_bytes()
    xmp = subprocess.run(["pdfinfo", "-meta", str(pdf)], capture_output=True, text=True, check=True).stdout
    assert 'pdfaid:part="3"' in xmp and 'pdfaid:conformance="B"' in xmp      # PDF/A-3b identification
    assert "2026-01-02T03:04:05" in xmp and "A. Auditor" in xmp               # dated from the run, author


def test_pdf_renderer_fetches_nothing_but_inline_data(tmp_path):
    fetcher = DataOnlyFetcher()
    html = ('<p>x</p><img src="file:///etc/passwd"><img src="http://example.com/a.png">'
            '<link rel="stylesheet" href="file:///etc/hosts">'
            '<img src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg==">')
    render_pdf(html, tmp_path / "x.pdf", [], fetcher)
    assert set(fetcher.refused) == {"file:///etc/passwd", "http://example.com/a.png", "file:///etc/hosts"}
    assert (tmp_path / "x.pdf").stat().st_size > 0


@pytest.fixture(scope="module")
def review_dir(tmp_path_factory):
    return build_review(tmp_path_factory.mktemp("review") / "golden-review")


def test_review_html_matches_reviewed_golden_file(review_dir):
    html = Path(render_review(review_dir, ("html",))["html"]).read_text()
    if os.environ.get("XAUDIT_UPDATE_GOLDEN"):
        GOLDEN_REVIEW.write_text(html)
    assert html == GOLDEN_REVIEW.read_text(), "review HTML changed: review it, then XAUDIT_UPDATE_GOLDEN=1 pytest ..."


def test_review_report_names_the_regressed_slice_is_self_contained_and_carries_its_evidence(review_dir, tmp_path):
    """The synthetic candidate is worse only on site 'south': the report leads with FAIL naming that slice,
    shows data as text, fetches nothing, and the PDF carries the review's tables."""
    import json
    validation = json.loads((review_dir / "validation.json").read_text())
    failed = {(c["slice_key"], c["slice_value"]) for c in validation["checks"] if c["status"] == "FAIL"}
    assert validation["verdict"] == "FAIL" and ("site", "south") in failed and ("site", "north") not in failed
    html = Path(render_review(review_dir, ("html",))["html"]).read_text()
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and all(r.startswith("data:") for r in refs) and "default-src 'none'" in html
    assert HOSTILE_LABEL not in html and "file:///etc/passwd" in html and 'src="file:' not in html
    head = html[:html.index("1 · Models and data")]
    assert "FAIL" in head and "site=south" in head
    for section in ("Models and data", "Metric changes per slice", "Attribution drift", "Method", "Sign-off",
                    "Reproducibility appendix", "pets 2.0", "pets 2.1"):
        assert section in html, section
    if not shutil.which("pdfdetach"):
        pytest.skip("poppler-utils (pdftotext, pdfdetach) not installed")
    pdf = Path(render_review(review_dir, ("pdf",))["pdf"])
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    assert "FAIL" in text.split("\f")[0] and "site=south" in text.split("\f")[0]
    subprocess.run(["pdfdetach", "-saveall", "-o", str(tmp_path), str(pdf)], check=True)
    for name in ("review_metrics.parquet", "validation.json", "manifest.json"):
        assert (tmp_path / name).read_bytes() == (review_dir / name).read_bytes()


def test_long_slice_and_class_names_fit_their_charts_and_warnings_are_not_drawn_as_failures():
    """Slice names of binned columns and ordinary class names ('astronaut') used to be clipped at the chart's
    left edge or run together under the confusion matrix; a WARN was drawn in FAIL's red."""
    import pandas as pd
    from xaudit.tasks.report import bar_chart, confusion_chart, worst_status
    labels = ["pixels=[40000, 70000)", "camera=" + "very long acquisition device name " * 3]
    rows = pd.DataFrame({"slice_key": ["overall", "pixels", "camera"], "slice_value": ["all", labels[0][7:], labels[1][7:]],
                         "metric": "accuracy", "sub_key": "", "suppressed": False, "value": [0.9, 0.8, 0.7],
                         "ci_low": [0.85, 0.7, 0.6], "ci_high": [0.95, 0.9, 0.8], "n": [100, 50, 50]})
    checks = [dict(slice_key="pixels", slice_value=labels[0][7:], metric="accuracy", status="WARN"),
              dict(slice_key="camera", slice_value=labels[1][7:], metric="accuracy", status="WARN"),
              dict(slice_key="camera", slice_value=labels[1][7:], metric="accuracy", status="FAIL")]
    status = worst_status(checks)
    chart = bar_chart(rows, "accuracy", status)
    for bar in chart["bars"]:
        text = f"{bar['label']} (n={bar['n']})"
        assert 5.6 * len(text) <= chart["left"] - 6 + 1e-9, text          # the label fits left of the bars
    assert chart["bars"][2]["label"].endswith("…") and chart["bars"][2]["full"] == labels[1]
    assert [b["flagged"] for b in chart["bars"]] == [None, "WARN", "FAIL"]
    names = ["astronaut", "cat", "coffee", "rocket", "x" * 60]
    metrics = pd.DataFrame({"slice_key": "overall", "metric": "confusion",
                            "sub_key": [f"{a}->{b}" for a in names for b in names], "value": 1.0})
    cm = confusion_chart(metrics, names)
    assert cm["pad"] - 6 >= 5.6 * max(len(n) for n in cm["names"]) and cm["names"][-1].endswith("…")
    assert cm["height"] >= cm["top"] + cm["k"] * cm["cell"] + 0.7 * cm["pad"]       # room for rotated labels


GOLDEN_COLOUR = Path(__file__).parent / "golden" / "report_colour.html"
LONG_CLASSES = ["astronaut on the launch pad", "cat", "coffee cup with a very long descriptive class name"]
LONG_SITES = ["north", "south", "acquisition-device-with-a-very-long-unbroken-identifier-0123456789abcdef"]


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """A run on 224² colour photos with long class names and an unbroken long slice value (what users bring,
    unlike the demo's 16² grey digits)."""
    return build(tmp_path_factory.mktemp("colour") / "colour-run", classes=LONG_CLASSES, site_names=LONG_SITES,
                 n=30, colour=224, run_id="colour-run")


def test_colour_report_matches_reviewed_golden_file(colour_run):
    html = render_html(colour_run)
    if os.environ.get("XAUDIT_UPDATE_GOLDEN"):
        GOLDEN_COLOUR.write_text(html)
    assert html == GOLDEN_COLOUR.read_text(), "colour report HTML changed: review it, then XAUDIT_UPDATE_GOLDEN=1 ..."


def test_colour_report_pdf_keeps_every_word_on_the_page_and_every_reason_whole(colour_run):
    """No word of the PDF may run off the page's right edge (long slice values, long class names, the reasons
    a signer reads), and every reason of a check that did not pass is printed whole."""
    import json
    if not shutil.which("pdftotext"):
        pytest.skip("poppler-utils (pdftotext) not installed")
    pdf = Path(render_report(colour_run, ("pdf",))["pdf"])
    bbox = subprocess.run(["pdftotext", "-bbox", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    pages = re.findall(r'<page width="([\d.]+)" height="[\d.]+">(.*?)</page>', bbox, re.S)
    assert pages
    for number, (width, body) in enumerate(pages, 1):
        for x_max, word in re.findall(r'<word xMin="[\d.]+" yMin="[\d.]+" xMax="([\d.]+)" yMax="[\d.]+">([^<]*)</word>', body):
            assert float(x_max) <= float(width) - 20, f"page {number}: {word!r} ends at {x_max} of {width}"
    text = " ".join(subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout.split())
    failed = [c for c in json.loads((colour_run / "validation.json").read_text())["checks"] if c["status"] != "PASS"]
    assert any(LONG_SITES[2] in c["message"] for c in failed) and any(c["status"] == "WARN" for c in failed)
    # a line may break inside the long value (pdftotext joins a break after '-' without it), but nothing is cut
    flat = text.replace(" ", "").replace("-", "")
    for c in failed:
        assert c["message"].replace(" ", "").replace("-", "") in flat, c["message"]


def test_an_empty_map_is_captioned_as_empty_not_shown_as_a_blank_panel(tmp_path):
    """A map that is zero everywhere (Grad-CAM of a class the last layer finds no positive evidence for) has no
    ROI mass; the card said nothing, so a reviewer saw an input with no overlay and no reason. Now the static
    gallery and the example browser both caption it 'empty map', and the other method keeps its ROI mass."""
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    run = build(tmp_path / "run", hostile=False)
    t = pq.read_table(run / "explanations.parquet").to_pandas()
    cam = t.method == "gradcam"
    t.loc[cam, "heatmap"] = pd_series_of_zeros(int(cam.sum()), 64, t.index[cam])
    t.loc[cam, "roi_mass"] = np.nan
    t["heatmap"] = t.heatmap.map(lambda v: np.asarray(v, dtype=np.uint8))
    heat = pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(t.heatmap.to_list())), 64)
    pq.write_table(pa.Table.from_pandas(t.drop(columns="heatmap"), preserve_index=False).append_column("heatmap", heat),
                   run / "explanations.parquet")
    html = render_html(run)
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", html)
    assert "gradcam · empty map" in captions and not any(c.startswith("gradcam · ROI") for c in captions)
    assert any(c.startswith("saliency · ROI") for c in captions)
    data = json.loads(re.search(r'<script type="application/json" id="xaudit-data">(.*?)</script>', html, re.S)
                      .group(1))
    rows = data["examples"]["rows"]
    assert rows and all(r["empty"] == ["gradcam"] for r in rows)


def pd_series_of_zeros(n, width, index):
    import numpy as np
    import pandas as pd
    return pd.Series([np.zeros(width, np.uint8) for _ in range(n)], index=index)


def test_a_thousand_class_model_gets_a_report_of_bounded_size_that_weasyprint_can_lay_out(tmp_path):
    """An ImageNet classifier (1,000 classes) made a 106 MB HTML report (a confusion matrix of a million cells,
    a mean map per class) and a PDF WeasyPrint could not lay out (the class list in one unbreakable block
    taller than a page). Now: the most frequent confusions as a table, the most frequent classes' mean maps,
    the first 60 class names with the count — and the PDF renders."""
    from xaudit.tasks.report import MAX_MAP_ROWS, TOP_CONFUSIONS
    classes = [f"class-{i:04d}" for i in range(1000)]
    run = build(tmp_path / "run", hostile=False, classes=classes, n=3000)
    out = render_report(run)
    html = Path(out["html"]).read_text()
    assert len(html) < 2_000_000, len(html)
    assert 'aria-label="confusion matrix"' not in html
    assert f"The {TOP_CONFUSIONS} most frequent confusions of" in html and "with 1000 classes the matrix is not drawn" in html
    shown = re.search(rf"The {MAX_MAP_ROWS} most frequent of (\d+) values\.", html)   # (the classes present)
    assert shown and int(shown.group(1)) > MAX_MAP_ROWS
    assert "1000: class-0000, class-0001" in html and "(940 more: all are in the attached manifest.json" in html
    assert "class-0999" not in html.split('id="identity"', 1)[1].split("</section>", 1)[0]
    assert Path(out["pdf"]).stat().st_size > 10_000
    if shutil.which("pdfinfo"):
        pages = subprocess.run(["pdfinfo", out["pdf"]], capture_output=True, text=True, check=True).stdout
        assert int(re.search(r"Pages:\s+(\d+)", pages).group(1)) < 30


def test_a_small_model_keeps_its_full_confusion_matrix(run_dir):
    html = render_html(run_dir)
    assert 'aria-label="confusion matrix"' in html and "most frequent confusions" not in html


def test_long_card_text_is_cut_with_a_pointer_to_the_manifest_and_wraps_on_the_page(tmp_path):
    """A model card's 100,000-character description ran off the PDF's page (cut at the bottom, lost to the
    reader) and a 3,000-character class name past its right edge: now the description shows 1,500 characters
    and says where the rest is, names show 80, and the facts' values wrap anywhere."""
    import json
    run = build(tmp_path / "run", hostile=False, classes=["a" * 3000, "b", "c"])
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["model"]["description"] = "word " * 20000
    (run / "manifest.json").write_text(json.dumps(manifest))
    html = render_html(run, browse=False)
    identity = html.split('id="identity"', 1)[1].split("</section>", 1)[0]
    assert "(the rest is in the attached manifest.json, under model)" in identity
    assert identity.count("word ") < 400 and "a" * 3000 not in identity and "a" * 79 + "…" in identity
    assert "overflow-wrap: anywhere" in html


@pytest.fixture(scope="module")
def long_review(tmp_path_factory):
    """A review on 224² colour photos with long class names, an unbroken long slice value and the longest
    statistic names a run has (`integrated_gradients.abs_completeness_delta`)."""
    return build_review(tmp_path_factory.mktemp("long-review") / "long-review", classes=LONG_CLASSES,
                        site_names=LONG_SITES, colour=224, methods=("integrated_gradients", "gradcam_plus_plus"),
                        long_stats=True)


def _words_past_the_edge(pdf: Path) -> list[str]:
    bbox = subprocess.run(["pdftotext", "-bbox", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    pages = re.findall(r'<page width="([\d.]+)" height="[\d.]+">(.*?)</page>', bbox, re.S)
    assert pages
    return [f"page {number}: {word!r} ends at {x_max} of {width}" for number, (width, body) in enumerate(pages, 1)
            for x_max, word in re.findall(r'<word xMin="[\d.]+" yMin="[\d.]+" xMax="([\d.]+)" yMax="[\d.]+">([^<]*)</word>', body)
            if float(x_max) > float(width) - 20]


def test_review_pdf_keeps_every_word_on_the_page_at_the_longest_names(long_review):
    """The review's tables (metric changes, flips, drift, checks, configuration) fit the page with the longest
    metric, method, class and slice names: every interval is printed whole, nothing past the right edge."""
    from xaudit.tasks.report import render_review
    if not shutil.which("pdftotext"):
        pytest.skip("poppler-utils (pdftotext) not installed")
    pdf = Path(render_review(long_review, ("pdf",))["pdf"])
    assert _words_past_the_edge(pdf) == []
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    assert "abs_completeness_delta" in text.replace("\n", "").replace(" ", "")


def test_the_class_maps_are_shown_once_when_the_first_slice_is_the_true_class(tmp_path):
    import json
    run = build(tmp_path / "run", hostile=False)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"]["metrics"]["slices"] = [["label_name"], ["site"]]
    (run / "manifest.json").write_text(json.dumps(manifest))
    html = render_html(run)
    assert "Mean attribution map per true class and method" in html
    assert "Mean attribution map per label_name" not in html


# --- the golden colour review: real models and data (data/golden_colour.py) ---------------------------------

@pytest.fixture(scope="session")
def golden_colour(prefect_harness, tmp_path_factory):
    """data/golden_colour.py run once: a real audit (HTML and PDF) and a real review of two training seeds on
    224x224 colour photos with long class names, long slice values and the longest statistic names."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("golden_colour", ROOT / "data" / "golden_colour.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run(tmp_path_factory.mktemp("golden-colour"))


def images_outside_their_boxes(html: str) -> list[str]:
    """Lay `html` out as the PDF is (WeasyPrint) and return every image whose border box leaves the card or
    shortcut block that holds it, or the page's content area."""
    import weasyprint

    from xaudit.tasks.report import DataOnlyFetcher
    doc = weasyprint.HTML(string=html, url_fetcher=DataOnlyFetcher()).render()
    bad: list[str] = []

    def edges(box):
        x, y = box.border_box_x(), box.border_box_y()
        return x, y, x + box.border_width(), y + box.border_height()

    def walk(box, holder, page, number):
        element = getattr(box, "element", None)
        classes = (element.get("class") or "").split() if element is not None else []
        if getattr(box, "element_tag", None) == "div" and {"card", "shortcut"} & set(classes) and \
                (holder is None or holder.element is not element):      # the block, not its line boxes
            holder = box
        if getattr(box, "element_tag", None) == "img":
            x0, y0, x1, y1 = edges(box)
            for name, outer in (("its card", holder), ("the page", page)):
                if outer is None:
                    continue
                a0, b0, a1, b1 = edges(outer)
                if x0 < a0 - 0.5 or y0 < b0 - 0.5 or x1 > a1 + 0.5 or y1 > b1 + 0.5:
                    bad.append(f"page {number}: {element.get('alt')!r} at x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f} "
                               f"leaves {name} (x {a0:.0f}-{a1:.0f}, y {b0:.0f}-{b1:.0f})")
        for child in getattr(box, "children", None) or []:
            walk(child, holder, page, number)
    for number, page in enumerate(doc.pages, 1):
        root = page._page_box
        walk(root, None, root.children[0] if root.children else None, number)
    return bad


@pytest.mark.parametrize("kind", ["audit", "review"])
def test_golden_colour_pdfs_keep_every_word_on_the_page_and_every_image_in_its_card(golden_colour, kind):
    from xaudit.tasks import report
    if not shutil.which("pdftotext"):
        pytest.skip("poppler-utils (pdftotext) not installed")
    folder = golden_colour[kind]
    pdf = folder / ("report.pdf" if kind == "audit" else "review.pdf")
    assert pdf.is_file()
    assert _words_past_the_edge(pdf) == []
    context = report.report_context(folder, browse=False) if kind == "audit" else \
        report.review_context(folder, browse=False)
    html = report._documents("report.html.j2" if kind == "audit" else "review.html.j2", context, ("pdf",))["pdf"]
    assert "<img" in html
    assert images_outside_their_boxes(html) == []
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    flat = text.replace("\n", "").replace(" ", "").replace("-", "")
    assert "abs_completeness_delta".replace("_", "") in flat.replace("_", "")
    assert "Süd" in text


def test_the_layout_check_sees_an_image_past_its_card(tmp_path):
    """The image check above can fail: a card image forced wider than its card is reported."""
    html = ('<html><head><style>@page { size: A4; margin: 1cm } .card { width: 100px; border: 1px solid #000 }'
            '.card img { width: 300px; height: 20px }</style></head><body><div class="card">'
            '<img alt="too wide" src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk'
            '+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="></div></body></html>')
    bad = images_outside_their_boxes(html)
    assert bad and "too wide" in bad[0] and "its card" in bad[0]
