"""The serve page in a real headless browser: the distribution's Chromium (/usr/bin/chromium) driven by Selenium
through /usr/bin/chromedriver (never a browser or driver Selenium downloads itself). Upload a bundled test image,
wait for the grid of k results with scores and thumbnails, click one to search with it, save a screenshot."""
import os
from pathlib import Path

import pytest

from test_serve import served, stored_sample  # noqa: F401  (the module-scoped server fixture)

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                reason="no /usr/bin/chromium and chromedriver (make install puts them there with apt)")


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a browser or a driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    yield driver
    driver.quit()


@pytest.mark.slow
def test_upload_shows_a_grid_of_k_results_and_a_click_searches_again(served, browser, test_shards,  # noqa: F811
                                                                     tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, url = served
    data, key = stored_sample(test_shards, 6)
    image = tmp_path / "query.jpg"
    image.write_bytes(data)
    k = 8
    browser.get(url + "/")
    box = browser.find_element(By.ID, "k")
    box.clear()
    box.send_keys(str(k))
    browser.find_element(By.ID, "file").send_keys(str(image))
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result")) == k)
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth > 0)"))
    cells = browser.find_elements(By.CSS_SELECTOR, ".result")
    scores = [float(c.find_element(By.CLASS_NAME, "score").text) for c in cells]
    assert scores == sorted(scores, reverse=True) and abs(scores[0] - 1.0) < 1e-3
    assert cells[0].get_attribute("data-key") == key
    assert all(c.find_element(By.CLASS_NAME, "label").text not in ("", "-") for c in cells)  # class names
    browser.save_screenshot(str(tmp_path / "serve_page.png"))
    assert (tmp_path / "serve_page.png").stat().st_size > 10_000

    second = cells[1].get_attribute("data-key")
    cells[1].click()  # search with that result
    wait.until(lambda d: "query: " + second in d.find_element(By.ID, "query").text)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result")) == k)
    assert browser.find_elements(By.CSS_SELECTOR, ".result")[0].get_attribute("data-key") == second
    assert browser.find_element(By.ID, "status").text == f"{k} results"
