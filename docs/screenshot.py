"""Make docs/serve.png: the chat page of `mmcompose serve` answering a question about a world image.

    python docs/screenshot.py MODEL IMAGE "QUESTION" [-o docs/serve.png]

MODEL is a checkpoint (the demo's composed DAMC model: RUN/composed/damc-linear), IMAGE one of its world's
images (RUN/world/media/image/NAME.png). Needs Debian's chromium and chromium-driver and selenium (the test
extra). The server runs on a free local port for the screenshot's duration only.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("image", type=Path)
    parser.add_argument("question")
    parser.add_argument("-o", "--out", type=Path, default=Path(__file__).with_name("serve.png"))
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mmcompose.cli", "serve", str(args.model), "--port", str(port)])
    profile = tempfile.mkdtemp(prefix="mmcompose-chromium-")
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit("the server stopped")
                time.sleep(0.5)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                     f"--user-data-dir={profile}", "--window-size=1000,700"):
            options.add_argument(flag)
        browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            wait = WebDriverWait(browser, 120)
            browser.get(url + "/")
            wait.until(lambda d: d.find_element(By.ID, "model-name").text)
            browser.find_element(By.CSS_SELECTOR, "input[type=file][data-modality=image]").send_keys(
                str(args.image.resolve()))
            wait.until(lambda d: args.image.name in d.find_element(By.ID, "attachments").text)
            browser.find_element(By.ID, "prompt").send_keys(args.question)
            browser.find_element(By.ID, "send").click()
            answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".message.assistant[data-done=true]"))
            print("answer:", browser.execute_script("return arguments[0].lastChild.textContent", answer))
            browser.save_screenshot(str(args.out))
        finally:
            browser.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
