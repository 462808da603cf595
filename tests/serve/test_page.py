"""The web page in a real headless Chromium: load it, attach a PNG, ask, and read the streamed answer; and the
attacks a browser can carry out on a loopback server for a foreign page (a no-cors POST, DNS rebinding), refused."""

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


REBOUND = "rebound.example.com"


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="mmcompose-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1000,700",
                 f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1"):  # what DNS rebinding makes of that name
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


@pytest.fixture
def foreign_site(tmp_path: Path):
    """Another origin on this machine (another port), as any web page the user visits."""
    import functools
    import http.server
    import threading

    (tmp_path / "index.html").write_text("<!doctype html><title>elsewhere</title><p>a page elsewhere</p>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()
    thread.join(timeout=10)


def _refusals(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The status of every request the server's guard refuses, and a failure if the model runs."""
    import mmcompose.serve.batcher as batcher_module
    from mmcompose.serve.guard import BrowserGuard

    refused: list[int] = []
    real = BrowserGuard.refusal

    def refusal(self, *args, **kwargs):
        error = real(self, *args, **kwargs)
        if error is not None:
            refused.append(error.status)
        return error

    monkeypatch.setattr(BrowserGuard, "refusal", refusal)
    monkeypatch.setattr(batcher_module, "prefill", lambda *a, **k: pytest.fail("the model ran"))
    return refused


def test_a_foreign_page_cannot_make_the_browser_run_the_model(server: Server, browser, foreign_site: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The attack of a page the user visits: a no-cors POST of a text/plain body needs no preflight."""
    refused = _refusals(monkeypatch)
    browser.get(foreign_site + "/")
    outcome = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(arguments[0], {method: "POST", mode: "no-cors", body: JSON.stringify(
            {messages: [{role: "user", content: "what lives in the desert?"}], max_tokens: 4})})
          .then(r => done(r.type), e => done("failed: " + e));
    """, server.url + "/v1/chat/completions")
    assert outcome == "opaque"  # the request went out; the page cannot see the answer either way
    assert refused == [403]


def test_a_rebound_name_gets_no_page_and_no_answer(server: Server, browser, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the attacker's name now resolves to 127.0.0.1, so its page is same-origin with the
    server; the Host header still carries the foreign name."""
    from selenium.webdriver.common.by import By

    refused = _refusals(monkeypatch)
    browser.get(f"http://{REBOUND}:{server.port}/")
    assert "host_not_allowed" in browser.find_element(By.TAG_NAME, "body").text
    status = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
              body: JSON.stringify({messages: [{role: "user", content: "hi"}], max_tokens: 4})})
          .then(r => done(r.status), e => done("failed: " + e));
    """)
    assert status == 403
    assert len(refused) >= 2 and set(refused) == {403}  # the page, the POST (and the browser's favicon request)
