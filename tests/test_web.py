"""The Gradio demo in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium).

CI installs the browser (.ci/run); elsewhere the test skips when no browser is on the machine.
"""
from __future__ import annotations

import shutil
import socket

import pytest

from persona.generation import Decoding

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian chromium + chromium-driver")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def demo_url(tiny_model_dir, sft_adapter, tmp_path_factory):
    from persona.web import serve
    port = free_port()
    app = serve(tiny_model_dir, {"sft": sft_adapter, "aligned": tmp_path_factory.mktemp("no-policy")},
                Decoding(max_new_tokens=6, temperature=0, batch_size=1), "all-minilm-l6-v2", port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


def test_type_a_message_see_a_reply_switch_model(browser, demo_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(demo_url)
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#message textarea"))
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#model-left label")]
    assert labels == ["base", "sft"]  # the aligned policy has no adapter here, so it is not offered

    box.send_keys("hello! do you have pets?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: "sft · persona score" in d.find_element(By.ID, "chat-left").text)
    assert "hello! do you have pets?" in browser.find_element(By.ID, "chat-left").text

    browser.find_element(By.XPATH, "//*[@id='model-left']//label[normalize-space()='base']").click()
    box.send_keys("what do you do for work?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: "base · persona score" in d.find_element(By.ID, "chat-left").text)
    text = browser.find_element(By.ID, "chat-left").text
    assert text.index("sft · persona score") < text.index("base · persona score")

    browser.find_element(By.ID, "side-by-side").find_element(By.CSS_SELECTOR, "input").click()
    box.send_keys("and your family?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: "persona score" in d.find_element(By.ID, "chat-right").text)
