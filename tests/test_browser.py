"""The lab in a real browser (Debian's Chromium driven by Playwright): a tiny run to the end, a run stopped midway,
bad input, a tiny sweep and two runs overlaid, and a screenshot of every tab in test-artifacts/."""
import re
from pathlib import Path

import pytest
from helpers import TINY_LAB_RUN, free_port
from playwright.sync_api import expect

from app import build_app, launch
from app.form import RunForm

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                     "(apt-get install -y chromium; .ci/run installs it)"),
]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    demo = build_app(tmp_path_factory.mktemp("runs"), defaults=RunForm(**TINY_LAB_RUN), poll_s=0.5)
    launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(demo.local_url)
        page.locator("#start").wait_for()
        yield page
        browser.close()
    demo.lab.manager.stop()
    demo.lab.manager.wait(60)
    demo.close()


def status(page, value: str, timeout_s: float):
    page.locator(f'#job-status[data-status="{value}"]').wait_for(timeout=timeout_s * 1000)


def test_a_tiny_run_shows_its_curves_and_results(page):
    page.screenshot(path=ARTIFACTS / "01-train-form.png", full_page=True)
    page.locator("#start").click()
    status(page, "done", 240)
    expect(page.locator("#loss-plot img")).to_be_visible(timeout=10_000)
    for name in ("base", "vera-r16", "lora-r2"):
        expect(page.locator("#job-results")).to_contain_text(name, timeout=10_000)
    page.screenshot(path=ARTIFACTS / "02-train-done.png", full_page=True)


def test_many_adapters_lists_a_new_run_when_it_ends_and_when_the_tab_opens(page):
    """Lists of runs follow the runs directory without a click on Refresh: the Many adapters tab, opened while a
    run trains, lists its adapters once it ends; opened again later, it lists them too."""
    page.reload()
    page.locator("#start").wait_for()
    page.locator("#start").click()
    expect(page.locator("#notice")).to_contain_text("started ", timeout=30_000)
    run = re.search(r"started (\S+)", page.locator("#notice").inner_text()).group(1)
    page.get_by_role("tab", name="Many adapters").click()
    # The status line (in the hidden Train tab) names the job: wait for this run's "done", not the last one's.
    page.wait_for_function("([run]) => { const s = document.querySelector('#job-status[data-status=\"done\"]'); "
                           "return s !== null && s.textContent.includes(run); }", arg=[run], timeout=240_000)
    pick = page.locator("#many-pick")
    pick.locator("input").click()
    expect(page.get_by_role("option", name=f"{run}/vera-r16")).to_be_visible(timeout=10_000)
    expect(page.get_by_role("option", name=f"{run}/lora-r2")).to_be_visible()
    page.keyboard.press("Escape")
    page.screenshot(path=ARTIFACTS / "02b-many-adapters-listed.png", full_page=True)
    page.get_by_role("tab", name="Train & compare").click()


def test_reload_reattaches_and_stop_stops_a_second_run(page):
    page.get_by_label("Steps").fill("500")
    page.locator("#start").click()
    status(page, "running", 60)
    page.wait_for_function("Number(document.querySelector('#job-status').dataset.step) >= 1", timeout=120_000)
    page.reload()  # a reloaded page finds the running job, curves included
    status(page, "running", 30)
    expect(page.locator("#loss-plot img")).to_be_visible(timeout=30_000)
    page.locator("#stop").click()
    status(page, "stopped", 60)
    step = int(page.locator("#job-status").get_attribute("data-step"))
    assert 1 <= step < 500
    page.screenshot(path=ARTIFACTS / "03-train-stopped.png", full_page=True)


@pytest.mark.parametrize("label, value, message", [
    ("VeRA r", "0", "VeRA r must be positive integers"),
    ("VeRA d_init", "nan", "VeRA d_init must be finite numbers"),
    ("VeRA r", "256,,x", "VeRA r has an empty item"),
])
def test_bad_input_shows_an_error_and_the_lab_stays_usable(page, label, value, message):
    field = page.get_by_label(label, exact=True)
    good = field.input_value()
    field.fill(value)
    page.locator("#start").click()
    page.get_by_text(re.compile(re.escape(message))).first.wait_for(timeout=20_000)
    page.screenshot(path=ARTIFACTS / f"04-bad-input-{label.replace(' ', '-')}.png")
    field.fill(good)
    page.get_by_role("button", name="Estimate").click()
    expect(page.locator("#estimate")).to_contain_text("vera", timeout=20_000)


def test_bad_upload_shows_an_error(page, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n')
    page.locator('input[type="file"]').first.set_input_files(str(bad))
    expect(page.locator("#preview textarea")).to_have_value(re.compile("columns found"), timeout=20_000)
    page.screenshot(path=ARTIFACTS / "05-bad-upload.png", full_page=True)


def test_results_tab_reopens_the_last_run(page):
    page.get_by_role("tab", name="Results").click()
    expect(page.locator("#results-table")).to_contain_text("vera-r16", timeout=30_000)
    expect(page.locator("#sweep-note")).to_contain_text("not a sweep")  # one setting per method
    expect(page.locator("#tradeoff-plot")).to_be_hidden()
    page.locator("#results-table").scroll_into_view_if_needed()
    page.screenshot(path=ARTIFACTS / "06-tab-results.png", full_page=True)


def test_outputs_tab_runs_base_vera_and_lora_side_by_side(page):
    page.get_by_role("tab", name="Outputs").click()
    expect(page.locator("#samples")).to_contain_text("label", timeout=30_000)
    page.get_by_label("Prompt (or text to classify)").fill("A warm, funny and moving film.")
    page.get_by_role("button", name="Run base | VeRA | LoRA").click()
    for name in ("base", "vera-r16"):
        expect(page.locator("#side-by-side")).to_contain_text(name, timeout=60_000)
    page.get_by_role("button", name="Check merged VeRA = unmerged").click()
    expect(page.get_by_text("same output ✓")).to_be_visible(timeout=60_000)
    page.screenshot(path=ARTIFACTS / "07-tab-outputs.png", full_page=True)


def test_many_adapters_tab_serves_one_mixed_batch(page):
    page.get_by_role("tab", name="Many adapters").click()
    page.locator("#many-pick input").click()
    page.get_by_role("option", name=re.compile(r"vera-r16$")).first.click()
    page.locator("#many-prompts textarea").fill("A warm, funny film.\nA dull, slow film.")
    page.locator("#many-assign textarea").fill("vera-r16\nbase")
    page.get_by_role("button", name="Run as one batch").click()
    expect(page.locator("#many-summary")).to_contain_text("One mixed batch", timeout=60_000)
    expect(page.locator("#many-table")).to_contain_text("vera-r16")
    expect(page.locator("#many-table")).to_contain_text("__base__")
    page.screenshot(path=ARTIFACTS / "07b-tab-many-adapters.png", full_page=True)
    # Bad input: an error message, and the tab still serves the next batch.
    page.locator("#many-prompts textarea").fill("")
    page.get_by_role("button", name="Run as one batch").click()
    expect(page.get_by_text("enter at least one prompt").first).to_be_visible(timeout=30_000)


def test_calculator_tab_shows_table_1(page):
    page.get_by_role("tab", name="Calculator").click()
    expect(page.locator("#calc-table")).to_contain_text("43008", timeout=30_000)  # RoBERTa-base, VeRA r=1024
    page.locator("#fit-model input").click()  # MiniLM: a few seconds of fake steps (SmolLM2 takes ~30 s)
    page.get_by_role("option", name="minilm-l6", exact=True).click()
    page.get_by_role("button", name="Will it fit?").click()  # 8 GiB, 256 tokens
    expect(page.locator("#fit-table")).to_contain_text("tokens fits", timeout=120_000)
    expect(page.locator("#fit-table")).to_contain_text("lora r=8")
    page.screenshot(path=ARTIFACTS / "08-tab-calculator.png", full_page=True)


def test_export_tab_hands_over_a_zip(page):
    page.get_by_role("tab", name="Export").click()
    expect(page.get_by_label("Adapter", exact=True)).to_have_value("vera-r16", timeout=30_000)
    page.get_by_role("button", name="Export", exact=True).click()
    link = page.locator("#export-file a").first
    expect(link).to_have_attribute("href", re.compile(r"/vera-r16-native\.zip$"), timeout=60_000)
    page.screenshot(path=ARTIFACTS / "09-tab-export.png", full_page=True)


def pick_run(page, label: re.Pattern, selected: int):
    """Select a run in the Runs tab's multi-select by a pattern of its label; `selected` runs are then chosen."""
    option = page.get_by_role("option", name=label).first
    if not option.is_visible():  # the list stays open after a choice; clicking the input again would close it
        page.locator("#runs-pick input").click()
    option.click()
    chosen = page.locator("#runs-pick").get_by_role("button", name=re.compile(r"^Remove \d+$"))
    expect(chosen).to_have_count(selected, timeout=10_000)


def test_a_tiny_sweep_shows_the_tradeoff_figure_and_a_table_sorted_by_metric(page):
    page.reload()  # the form's defaults again (earlier tests changed steps and the data set)
    page.locator("#start").wait_for()
    for label, value in (("VeRA r", "8,16"), ("VeRA d_init", "0.1,1"), ("LoRA r", "2,4"), ("Steps", "2")):
        page.get_by_label(label, exact=True).fill(value)
    page.get_by_role("button", name="Estimate").click()
    expect(page.locator("#plan")).to_contain_text("7 runs: base, vera-r8-d0.1, vera-r8-d1, vera-r16-d0.1, "
                                                  "vera-r16-d1, lora-r2, lora-r4", timeout=20_000)
    page.locator("#start").click()
    expect(page.locator("#notice")).to_contain_text("started", timeout=30_000)
    name = page.locator("#notice").inner_text().split("started ")[1].split()[0]
    # The earlier run's "done" shows until the first poll: wait for this job's own.
    page.locator('#job-status[data-status="done"]', has_text=name).wait_for(timeout=300_000)

    page.get_by_role("tab", name="Runs").click()
    expect(page.locator("#runs-table")).to_contain_text("lora-r4", timeout=30_000)
    pick_run(page, re.compile(r"lora-r4\)$"), 1)
    page.get_by_role("button", name="Open in Results").click()
    expect(page.locator("#tradeoff-plot img")).to_be_visible(timeout=30_000)
    expect(page.locator("#dinit-plot img")).to_be_visible(timeout=30_000)
    expect(page.locator("#sweep-table")).to_contain_text("vera-r16-d1", timeout=30_000)
    rows = page.locator('#sweep-table [role="row"].virtual-row')  # Gradio's data rows (the header is a <tr>)
    expect(rows).to_have_count(7, timeout=30_000)
    texts = rows.all_inner_texts()
    accuracy = [float(re.search(r"accuracy ([0-9.]+)%", t).group(1)) for t in texts]
    assert accuracy == sorted(accuracy, reverse=True), texts
    assert {re.match(r"\s*(\S+)", t).group(1) for t in texts} == {
        "base", "vera-r8-d0.1", "vera-r8-d1", "vera-r16-d0.1", "vera-r16-d1", "lora-r2", "lora-r4"}
    page.locator("#tradeoff-plot").scroll_into_view_if_needed()
    page.screenshot(path=ARTIFACTS / "10-sweep-results.png", full_page=True)


def test_runs_tab_overlays_two_runs(page):
    page.get_by_role("tab", name="Runs").click()
    expect(page.locator("#runs-table")).to_contain_text("finished", timeout=30_000)
    page.wait_for_timeout(1500)  # opening the tab refreshes the history, which re-renders the picker
    page.get_by_role("button", name="Clear").click()  # the sweep may still be selected from the test before
    pick_run(page, re.compile(r"lora-r4\)$"), 1)  # the sweep
    pick_run(page, re.compile(r"\(base, vera-r16, lora-r2\)$"), 2)  # the first tiny run
    page.locator("#overlay").click()
    expect(page.locator("#overlay-plot img")).to_be_visible(timeout=30_000)
    table = page.locator("#overlay-table")
    for name in ("vera-r16-d1", "lora-r4", "lora-r2"):
        expect(table).to_contain_text(name, timeout=30_000)
    rows = table.locator('[role="row"].virtual-row').all_inner_texts()
    directories = {re.match(r"\s*(\S+)", t).group(1) for t in rows}
    assert len(directories) == 2, directories
    page.screenshot(path=ARTIFACTS / "11-tab-runs.png", full_page=True)
