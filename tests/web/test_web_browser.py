"""The feature browser in a real headless browser: Debian's Chromium driven by Playwright (which never downloads
a browser here: it is pointed at /usr/bin/chromium). It checks what a person sees: the runs page, a run with its
plots drawn, a feature dashboard whose highlighted token is the max token, and the try-a-text box. Screenshots
of each page are saved under the test's tmp dir (MIDISC_SCREENSHOTS=folder copies them there, as docs/ has)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from midisc.store import Store

pytestmark = pytest.mark.slow
CHROMIUM = Path(os.environ.get("MIDISC_CHROMIUM", "/usr/bin/chromium"))


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"no browser at {CHROMIUM}: .ci/run installs Debian's chromium (apt-get install -y chromium)")
        pytest.skip(f"no browser at {CHROMIUM} (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    from test_serve import free_port, serve

    work, run_id = trained_run
    port = free_port()
    process = serve(["--db", f"sqlite:///{work / 'runs.db'}"], tmp_path_factory.mktemp("serve"), port)
    yield f"http://127.0.0.1:{port}", f"sqlite:///{work / 'runs.db'}", run_id
    process.terminate()
    process.communicate(timeout=30)


@pytest.fixture
def page(browser, tmp_path):
    opened = browser.new_page(viewport={"width": 1300, "height": 900})
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(str(error)))
    opened.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    yield opened
    opened.close()
    assert problems == []  # no script error, no asset that failed to load


def screenshot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    if os.environ.get("MIDISC_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["MIDISC_SCREENSHOTS"]) / path.name)


def drawn(page, chart: str) -> int:
    """Points or bars Chart.js drew on the canvas `chart` (0 when it drew nothing)."""
    return page.evaluate(f"() => (window.midiscCharts['{chart}']?.getDatasetMeta(0).data.length) || 0")


def test_the_runs_page_lists_the_run_and_opens_it(server, page, tmp_path):
    base, _, run_id = server
    page.goto(base + "/")
    row = page.locator(f'#runs tr[data-run="{run_id}"]')
    assert row.locator(".status").inner_text() == "completed"
    screenshot(page, tmp_path, "runs")
    row.locator(f'a[href="/runs/{run_id}"]').click()
    page.wait_for_url(f"{base}/runs/{run_id}")
    assert page.locator("h1").inner_text().startswith(f"run {run_id}: topk SAE")


def test_a_run_page_draws_its_curves_and_frequency_histogram(server, page, tmp_path):
    base, url, run_id = server
    page.goto(f"{base}/runs/{run_id}")
    page.wait_for_function("() => window.midiscCharts && window.midiscCharts.curves && window.midiscCharts.histogram")
    with Store(url) as store:
        epochs = len(store.epoch_metrics(run_id))
    assert drawn(page, "curves") == epochs and drawn(page, "histogram") > 0
    assert page.locator("#feature-list tbody tr").count() == 50
    page.locator("#feature-list th a", has_text="max").click()  # sort by max activation, on the server
    values = [float(v) for v in page.locator("#feature-list tbody tr td:nth-child(4)").all_inner_texts()]
    assert values == sorted(values, reverse=True)
    screenshot(page, tmp_path, "run")


def test_a_dashboard_highlights_the_max_token_of_each_top_example(server, page, tmp_path):
    base, url, run_id = server
    with Store(url) as store:
        feature = store.feature_page(run_id, sort="frequency", limit=1).rows[0]["feature_index"]
        tops = store.feature_examples(run_id, features=[feature], kind="top")
    page.goto(f"{base}/runs/{run_id}/features/{feature}")
    page.wait_for_function("() => window.midiscCharts && window.midiscCharts.density")
    assert drawn(page, "density") > 0 and drawn(page, "logits") > 0
    rows = page.locator("#top-examples tr")
    assert rows.count() == min(10, len(tops))
    for i in range(rows.count()):
        marked = rows.nth(i).locator(".tok.max")
        assert marked.count() == 1
        expected = tops[i]["tokens"][tops[i]["max_token_index"]].replace("\n", "⏎")
        assert marked.inner_text() == expected.strip() or marked.text_content() == expected
        # The marked token is the most strongly coloured one of its example.
        shades = rows.nth(i).locator(".tok").evaluate_all(
            "spans => spans.map(s => Number(s.style.getPropertyValue('--shade')))")
        assert max(shades) == shades[tops[i]["max_token_index"]]
    screenshot(page, tmp_path, "feature")
    page.locator('#similar a').first.click()  # a similar feature's dashboard is one click away
    page.wait_for_url(f"{base}/runs/{run_id}/features/*")


def test_try_a_text_shows_the_features_of_each_token_and_links_to_their_dashboards(server, page, tmp_path):
    base, _, run_id = server
    page.goto(f"{base}/runs/{run_id}/try")
    page.wait_for_function("() => document.getElementById('try-status').textContent.startsWith('model ready')",
                           timeout=120_000)
    text = "the market rose as shares in the bank fell"
    page.fill("textarea", text)
    page.click("text=show features")
    page.wait_for_selector("#try-features tbody tr")
    tokens = page.locator("#try-tokens .tok").all_text_contents()
    assert "".join(tokens) == text
    assert page.locator("#try-tokens .tok.max").count() >= 1
    timing = page.locator("#try-status").inner_text()  # "N tokens in M ms", measured in the browser
    assert timing.startswith(f"{len(tokens)} tokens in ") and int(timing.split()[-2]) < 1000, timing
    screenshot(page, tmp_path, "try")
    first = page.locator("#try-features tbody tr a").first
    feature = first.inner_text().split()[-1]
    first.click()
    page.wait_for_url(f"{base}/runs/{run_id}/features/{feature}")
    assert page.locator("h1").inner_text().startswith(f"Feature {feature}")
