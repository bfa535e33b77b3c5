"""The page at ``/`` in headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven
by Selenium): pick an example file, transcribe it, read the transcript and the decoding
statistics off the page; they must match the library's own result for that file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_serve import OPTIONS, live_server
from test_transcribe import make_checkpoint

from speechllama import load_model
from speechllama.serve import ServeConfig, create_app

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

torch.set_num_threads(1)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (scripts/setup.sh installs them)",
)
EXAMPLE = Path(__file__).resolve().parents[1] / "speechllama/assets/audio/LJ001-0008.flac"


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    # The Debian driver, by path: Selenium must not try to download a browser or driver.
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_page_transcribes_an_example(browser, tmp_path):
    transcriber = load_model(make_checkpoint(tmp_path))
    expected = transcriber.transcribe(EXAMPLE, OPTIONS)
    with live_server(create_app(transcriber, OPTIONS, ServeConfig())) as url:
        browser.get(url + "/")
        browser.find_element(By.ID, "file").send_keys(str(EXAMPLE))
        browser.find_element(By.ID, "submit").click()
        WebDriverWait(browser, 60).until(
            expected_conditions.text_to_be_present_in_element((By.ID, "status"), "Done")
        )
        transcript = browser.find_element(By.ID, "transcript").text
        stats = {
            row.find_element(By.TAG_NAME, "th").text: row.find_element(By.TAG_NAME, "td").text
            for row in browser.find_elements(By.CSS_SELECTOR, "#stats tr")
        }
        assert browser.find_element(By.ID, "error").text == ""
    # The page shows "(no speech)" for an empty transcript; the browser renders runs of
    # whitespace as one space.
    assert transcript == (" ".join(expected.text.split()) or "(no speech)")
    assert stats["decoder calls"] == str(expected.decoder_calls)
    assert stats["tokens"] == str(len(expected.tokens))
    assert stats["tokens accepted per call"] == f"{expected.tokens_per_call:.2f}"
