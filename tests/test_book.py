"""The built book as a reader meets it: pages in a real browser, and the PDF.

These tests read `_book/_build` and run after the book is built (`make test` builds it first);
they are marked `book` so that the plain `pytest` step can leave them out.
"""
import functools
import http.server
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
HTML = REPO / "_book" / "_build" / "html"
PDF = REPO / "_book" / "_build" / "latex" / "book.pdf"
ARTIFACTS = REPO / "_book" / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")

pytestmark = pytest.mark.book


def chapters():
    "The toc's files, in book order: root first, then each part's chapters (the appendices last)."
    toc = yaml.safe_load((REPO / "_book" / "_toc.yml").read_text())
    parts = toc.get("parts") or [{"chapters": toc.get("chapters", [])}]
    return [toc["root"]] + [c["file"] for p in parts for c in p["chapters"]]


def chapter_titles():
    "Each chapter notebook's `# Title` line."
    import json
    out = []
    for f in chapters()[1:]:
        nb = json.loads((REPO / f"{f}.ipynb").read_text())
        first = "".join(nb["cells"][0]["source"])
        out.append(re.match(r"#\s+(.+)", first).group(1).strip())
    return out


def figures_drawn(doc):
    "How many figures the notebook's executed cells draw with `plt.show()` (a lower bound on its images)."
    import json
    nb = json.loads((REPO / f"{doc}.ipynb").read_text())
    return sum("".join(c["source"]).count("plt.show()") for c in nb["cells"]
               if c["cell_type"] == "code" and "#| eval: false" not in "".join(c["source"]))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@pytest.fixture(scope="module")
def site():
    "Serve the built HTML book on 127.0.0.1; yields its base URL."
    if not (HTML / "index.html").is_file():
        pytest.fail("no built book: run `make html` (or `make test`, which builds it) first")
    handler = functools.partial(QuietHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's `chromium` (make test does, as root)")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
            "--no-first-run", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def open_page(browser, url):
    "Open `url`; return (page, console errors, requests that left localhost)."
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors, outside = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: errors.append(f"HTTP {r.status} for {r.url}") if r.status >= 400 else None)
    page.on("request", lambda r: outside.append(r.url)
            if not re.match(r"^(https?://127\.0\.0\.1[:/]|data:|blob:|about:)", r.url) else None)
    page.goto(url, wait_until="networkidle")
    # widgets render after the page is idle; wait for every saved view, so that their errors count too
    views = page.locator('script[type="application/vnd.jupyter.widget-view+json"]').count()
    if views:
        page.wait_for_function("n => document.querySelectorAll('.widget-subarea > *').length >= n",
                               arg=views, timeout=30_000)
        page.wait_for_timeout(500)
    return page, errors, outside


@pytest.mark.parametrize("doc", chapters())
def test_chapter_page_loads_offline_and_clean(browser, site, doc):
    page, errors, outside = open_page(browser, f"{site}/{doc}.html")
    assert errors == [], f"console errors on {doc}: {errors}"
    assert outside == [], f"{doc} asked for resources outside the site: {outside}"
    code = page.locator("div.cell_input pre").all_inner_texts()
    assert code, f"{doc} shows no code cells"
    assert not [c for c in code if re.search(r"^\s*#\|", c, re.M)], f"{doc} shows nbdev directives"
    assert "{target=" not in page.locator("main").inner_text(), f"{doc} shows show_doc's raw link attributes"
    # a kernel started with MPLBACKEND=Agg draws nothing: every plt.show() must leave an image behind
    images = page.locator("div.cell_output img").count()
    assert images >= figures_drawn(doc), f"{doc} shows {images} images for {figures_drawn(doc)} plt.show() calls"
    ran = page.locator("p.exec-time").all_inner_texts()
    assert len(ran) == 1 and re.search(r"ran in \d+\.\d s", ran[0]), f"{doc} does not say how long it ran: {ran}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{Path(doc).name}.png"), full_page=False)
    page.close()


def test_exercise_solutions_are_folded_not_removed(browser, site):
    page, errors, _ = open_page(browser, f"{site}/nbs/07_train.html")
    toggles = page.locator("details.hide.above-input")
    assert toggles.count() >= 3, "the three solutions of the chapter should each sit behind a toggle"
    assert not any(toggles.nth(i).evaluate("e => e.open") for i in range(toggles.count()))  # folded, output too
    toggles.first.locator("summary").click()
    assert toggles.first.evaluate("e => e.open") and "Solution 1" in toggles.first.inner_text()
    assert errors == []
    page.close()


def test_math_is_typeset(browser, site):
    page, errors, _ = open_page(browser, f"{site}/{chapters()[0]}.html")
    page.wait_for_selector("mjx-container", timeout=15_000)
    assert page.locator("mjx-container").count() >= 3
    assert errors == []
    page.close()


def test_attention_explorer_switches_views_without_python(browser, site):
    page, errors, outside = open_page(browser, f"{site}/nbs/02a_attention_explorer.html")
    page.wait_for_selector(".widget-dropdown select", timeout=30_000)
    assert errors == [] and outside == [], (errors, outside)
    widget = page.locator(".widget-vbox").first  # the explorer: controls and its stack of views
    shown = lambda caption: any(e.is_visible() for e in widget.get_by_text(caption, exact=False).all())
    assert shown("layer 0, all heads") and not shown("layer 1, all heads")
    widget.locator(".widget-dropdown select").first.select_option(index=1)  # jslink: no kernel involved
    page.wait_for_timeout(300)
    assert shown("layer 1, all heads") and not shown("layer 0, all heads")
    widget.locator(".widget-toggle-buttons button", has_text="0").first.click()
    page.wait_for_timeout(300)
    assert shown("layer 1, head 0") and not shown("layer 1, all heads")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "attention-explorer.png"), full_page=False)
    page.close()


def test_pdf_has_title_toc_and_every_chapter():
    pypdf = pytest.importorskip("pypdf")
    if not PDF.is_file():
        pytest.fail("no PDF: run `make pdf` (or `make test`) first")
    reader = pypdf.PdfReader(str(PDF))
    assert len(reader.pages) >= 10 * (len(chapters()) - 1)
    squash = lambda t: re.sub(r"\s+", "", t).replace("\u2019", "'").lower()  # extraction may drop spaces
    assert squash("Build a Large Language Model from Scratch") in squash(reader.pages[0].extract_text())
    outline = []

    def walk(items):
        for it in items:
            if isinstance(it, list): walk(it)
            else: outline.append(it.title)
    walk(reader.outline)
    for t in chapter_titles():
        assert any(squash(t) in squash(o) for o in outline), f"chapter {t!r} not in the PDF outline {outline}"
    for part in yaml.safe_load((REPO / "_book" / "_toc.yml").read_text()).get("parts", []):  # the parts, as in the HTML
        assert any(squash(part["caption"]) in squash(o) for o in outline), f"part {part['caption']!r} not in the PDF outline"
    text = "".join(reader.pages[i].extract_text() for i in range(len(reader.pages) - 40, len(reader.pages)))
    assert "appendix" in squash(text), "the last part should be lettered as appendices"
    # two pages rendered as images, for people to look at
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for n in (1, min(len(reader.pages), 12)):
        subprocess.run(["pdftoppm", "-png", "-r", "60", "-f", str(n), "-l", str(n), "-singlefile",
                        str(PDF), str(ARTIFACTS / f"pdf-page-{n}")], check=True)
        assert (ARTIFACTS / f"pdf-page-{n}.png").stat().st_size > 5_000


def test_pdf_has_a_glyph_for_every_character():
    "XeLaTeX logs each character no font had; the PDF would show a blank there (CJK, emoji, arrows)."
    log = PDF.with_suffix(".log")
    if not log.is_file():
        pytest.fail("no LaTeX log: run `make pdf` (or `make test`) first")
    missing = sorted(set(re.findall(r"Missing character: There is no (.+?) in font", log.read_text(errors="replace"))))
    assert not missing, f"characters without a glyph in the PDF: {missing}; add a fallback in _book/_ext/nbdev_cells.py"
