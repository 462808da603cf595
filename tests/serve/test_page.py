"""The web page in a real headless Chromium: load it, attach a PNG, ask, and read the streamed answer."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.serve.conftest import Server, png_data_url

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra (pip install selenium)")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason="needs Debian's chromium and chromium-driver "
                                       "(apt-get install -y chromium chromium-driver)")


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="mmcompose-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1000,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_page_attaches_a_png_and_streams_the_answer(server: Server, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "photo.png"
    import base64

    image.write_bytes(base64.b64decode(png_data_url(5).split(",")[1]))
    question = "what is in this picture?"
    wait = WebDriverWait(browser, 30)
    browser.get(server.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "model-name").text == "tiny-model")
    modalities = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#modalities .modality")]
    assert modalities == ["image", "audio", "point"]
    picker = browser.find_element(By.CSS_SELECTOR, "input[type=file][data-modality=image]")
    picker.send_keys(str(image))
    wait.until(lambda d: "photo.png" in d.find_element(By.ID, "attachments").text)
    browser.find_element(By.ID, "prompt").send_keys(question)
    browser.find_element(By.ID, "send").click()
    answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".message.assistant[data-done=true]"))
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    status, reply = server.chat([{"type": "image_url", "image_url": {"url": png_data_url(5)}},
                                 {"type": "text", "text": question}])
    assert status == 200
    shown = browser.execute_script("return arguments[0].lastChild.textContent", answer)
    assert shown == reply["choices"][0]["message"]["content"] != ""
    assert browser.find_elements(By.CSS_SELECTOR, ".message.user img")  # the attachment is shown
    browser.save_screenshot(str(os.environ.get("MMCOMPOSE_SCREENSHOT", tmp_path / "page.png")))


def test_page_shows_errors(server: Server, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    wait = WebDriverWait(browser, 30)
    browser.get(server.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "model-name").text == "tiny-model")
    browser.find_element(By.CSS_SELECTOR, "input[type=file][data-modality=image]").send_keys(str(broken))
    wait.until(lambda d: "broken.png" in d.find_element(By.ID, "attachments").text)
    browser.find_element(By.ID, "prompt").send_keys("and this?")
    browser.find_element(By.ID, "send").click()
    error = wait.until(lambda d: d.find_element(By.ID, "error") if d.find_element(By.ID, "error").text else None)
    assert "image" in error.text.lower()


def test_dropping_a_file_attaches_it(server: Server, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(server.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "model-name").text == "tiny-model")
    # a drop event carrying a real File, as the browser builds it when a file is dragged onto the page
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        document.body.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
    """, png_data_url(9).split(",")[1])
    wait.until(lambda d: "image: dropped.png" in d.find_element(By.ID, "attachments").text)
    browser.find_element(By.ID, "send").click()
    answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".message.assistant[data-done=true]"))
    assert browser.execute_script("return arguments[0].lastChild.textContent", answer) != ""
