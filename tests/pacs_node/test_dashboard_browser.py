"""The dashboard in a real headless Chromium: it loads, shows a processed study with its preview,
and the re-run button queues a new job."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_dashboard import STUDY, TOKEN, DashboardNode, build_node  # noqa: F401  (same folder)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (dev extra) not installed")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian packages chromium and chromium-driver",
)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[DashboardNode]:
    yield from build_node(tmp_path)


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="igtv-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_page_shows_processed_study_with_preview_and_rerun_works(node: DashboardNode, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    browser.get(node.base + "/")

    # The node has a token: the page asks for it, and shows data only after it is given.
    token_box = wait.until(ec.visibility_of_element_located((By.ID, "token")))
    assert not browser.find_element(By.ID, "main").is_displayed()
    token_box.send_keys("wrong-token")
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "login-error"), "not accepted"))
    token_box.clear()
    token_box.send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()

    # The processed study is listed, de-identified, with its latest job.
    row = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, f'#studies tr[data-study="{STUDY}"]')))
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    assert cells[1] == "20250131" and cells[2] == "CT, PT" and cells[3] == "5"
    assert "PAT-0042" not in browser.page_source
    job_row = browser.find_element(By.CSS_SELECTOR, f'#jobs tr[data-job="{node.done_job}"]')
    job_cells = [c.text for c in job_row.find_elements(By.TAG_NAME, "td")]
    assert job_cells[2] == "done" and job_cells[5] == "14.00" and job_cells[6] == "9.25" and job_cells[7] == "21.0"

    # Its detail shows the preview image (fetched with the token) and the report numbers.
    job_row.click()
    wait.until(lambda d: d.find_element(By.ID, "preview").get_attribute("data-loaded") == "1")
    size = browser.execute_script(
        "const i = document.getElementById('preview'); return [i.naturalWidth, i.naturalHeight];"
    )
    assert size == [64, 48]
    numbers = browser.find_element(By.ID, "numbers").text
    assert "14.00 cc" in numbers and "21.0 mm" in numbers

    # Re-run: a new queued job for the same study appears, in the index and on the page.
    browser.find_element(By.ID, "rerun").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "action-result"), "Queued as job #"))
    new_id = int(browser.find_element(By.ID, "action-result").text.split("#")[1].rstrip("."))
    new_job = node.jobs.job(new_id)
    assert new_job is not None and new_job.state == "queued" and new_job.study_uid == STUDY
    wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, f'#jobs tr[data-job="{new_id}"]')))
    assert node.woken == ["workers"]
    logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]]
    assert not logs, logs
