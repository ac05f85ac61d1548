"""The Prefect UI in a real browser: find the aeflow deployment, press Run -> Quick run, the run completes.

Headless Chromium (Debian's ``chromium`` + ``chromium-driver``, installed by ``make test``
when missing) driven by Selenium, with every feature that would reach the internet off.
"""

from __future__ import annotations

import shutil
import time
import warnings

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs chromium and chromedriver (make test installs them as root: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # failed API calls land in the console log
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-extensions", "--no-first-run", "--no-default-browser-check",
                "--metrics-recording-only", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _evidence(driver, tmp_path, served=None) -> str:
    shot = tmp_path / "ui.png"
    try:
        driver.save_screenshot(str(shot))
    except Exception:
        pass
    try:
        console = "\n".join(f"  {e.get('level')} {e.get('message')}" for e in driver.get_log("browser"))
    except Exception as e:  # noqa: BLE001 - evidence only
        console = f"  (no console log: {e})"
    server_log = ""
    if served is not None:
        path = served.workdir / "prefect-home" / "server.log"
        if path.exists():
            server_log = "\nprefect server log (tail):\n" + path.read_text(errors="replace")[-3000:]
    return (f"at {driver.current_url}; screenshot {shot}; browser console:\n{console[-3000:]}{server_log}\n"
            f"page text:\n{driver.find_element('tag name', 'body').text[:1500]}")


def test_quick_run_from_the_ui(served, browser, tmp_path):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    dep = served.deployment("reduce")
    with served.client() as c:
        before = {r.id for r in c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))}

    wait = WebDriverWait(browser, 60)

    def quick_run() -> None:
        wait.until(ec.url_contains(str(dep.id)))
        wait.until(ec.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Run']"))).click()
        wait.until(ec.element_to_be_clickable((By.XPATH, "//*[normalize-space()='Quick run']"))).click()

    def new_runs(seconds: float) -> list:
        found: list = []
        deadline = time.monotonic() + seconds
        while not found and time.monotonic() < deadline:
            with served.client() as c:
                runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            found = [r for r in runs if r.id not in before]
            time.sleep(0.5)
        return found

    try:
        browser.get(f"{served.ui_url}/deployments")
        # With every application deployed the list spans pages: search for it, as a user would.
        search = wait.until(ec.element_to_be_clickable(
            (By.XPATH, "//input[contains(translate(@placeholder, 'SEARCH', 'search'), 'search')]")))
        search.send_keys("reduce")
        link = wait.until(ec.element_to_be_clickable(
            (By.XPATH, f"//a[contains(@href, '/deployments/deployment/{dep.id}') and normalize-space()='reduce']")))
        link.click()
        quick_run()
        new = new_runs(30)
        attempts = 1
        if not new:
            # Once (CI, 2 cores under load) the UI's create call got an error response and showed its
            # "Something went wrong" toast. A user presses Run again after reloading; so does the test,
            # once, and says so. A second failure fails the test with the browser console and server log.
            warnings.warn(f"Quick run created no flow run at the first press; retrying. {_evidence(browser, tmp_path, served)}",
                          stacklevel=1)
            browser.refresh()
            quick_run()
            new = new_runs(30)
            attempts = 2
    except TimeoutException as e:
        pytest.fail(f"UI step timed out: {e.msg}; {_evidence(browser, tmp_path, served)}")

    assert 1 <= len(new) <= attempts, f"the UI created {len(new)} flow runs in {attempts} press(es); {_evidence(browser, tmp_path, served)}"
    fr = served.wait_final(new[0].id)
    assert fr.state.is_completed(), f"{fr.state}:\n{served.log_tail()}"
    assert fr.name.startswith("reduce-digits.csv-")

    # the finished run is visible in the UI under its readable name
    browser.get(f"{served.ui_url}/runs/flow-run/{fr.id}")
    try:
        WebDriverWait(browser, 60).until(ec.presence_of_element_located((By.XPATH, f"//*[contains(text(), '{fr.name}')]")))
        WebDriverWait(browser, 60).until(ec.presence_of_element_located((By.XPATH, "//*[normalize-space()='Completed']")))
    except TimeoutException:
        pytest.fail(f"flow run page does not show the completed run; {_evidence(browser, tmp_path, served)}")
