"""The Gradio demo: under load through gradio_client, and in a real headless Chromium (selenium).

The load tests start the app on a free loopback port with the tiny random model and need no browser.
The browser test uses Debian's chromium + chromedriver: CI installs them (.ci/run); elsewhere it skips.
"""
from __future__ import annotations

import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from persona.__main__ import main as cli
from persona.generation import Decoding
from persona.loadtest import Outcome, chat, check_loopback, connect, disconnect, summarize
from persona.loadtest import main as loadtest
from persona.web import MAX_MESSAGE_CHARS, QUEUE_SIZE, Demo, build_app

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian chromium + chromium-driver")


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
def demo(tiny_model_dir, sft_adapter, tmp_path_factory):
    """One loaded demo shared by every app below (the aligned policy has no adapter here, so it is not offered)."""
    return Demo(tiny_model_dir, {"sft": sft_adapter, "aligned": tmp_path_factory.mktemp("no-policy")},
                Decoding(max_new_tokens=3, temperature=0, batch_size=1), "all-minilm-l6-v2")


@contextmanager
def running(app):
    """The app served on a free loopback port while the block runs; yields its URL."""
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


@pytest.fixture(scope="module")
def demo_url(demo):
    with running(build_app(demo)) as url:
        yield url


def test_twenty_concurrent_chats_are_all_answered(demo_url, capsys):
    # 20 chats have at most 19 messages waiting behind the one being answered, so the default queue takes them all
    assert QUEUE_SIZE >= 20
    assert loadtest(["--url", demo_url, "--chats", "20", "--messages", "2"]) == 0
    out = capsys.readouterr().out
    assert "requests: 40 sent, 40 succeeded, 0 refused (queue full), 0 failed" in out
    assert "latency of answered requests: p50 " in out and "throughput: " in out


def test_a_full_queue_refuses_at_once_and_the_demo_serves_on(demo):
    with running(build_app(demo, queue_size=5)) as url:
        clients = connect(url, 20)
        with ThreadPoolExecutor(len(clients)) as pool:
            with demo.lock:  # the model is busy: a message waits in the queue or is refused
                chats = [pool.submit(chat, client, index, 1) for index, client in enumerate(clients)]
                # at most 1 being answered + 5 waiting: the 14 others are refused, so done, while the model is busy
                deadline = time.monotonic() + 60
                while sum(future.done() for future in chats) < 14 and time.monotonic() < deadline:
                    time.sleep(0.05)
                done_while_busy = sum(future.done() for future in chats)
            outcomes = [outcome for future in chats for outcome in future.result()]
        summary = summarize(outcomes, 1.0)
        assert summary["failed"] == 0, summary["first_error"]
        assert done_while_busy >= 14 and summary["refused"] >= 14 and summary["succeeded"] + summary["refused"] == 20
        assert all(o.error == "Queue is full! Please try again." for o in outcomes if o.status == "refused")
        assert [o.status for o in chat(clients[0], 0, 1)] == ["ok"]  # the burst is over: a new message is answered
        disconnect(clients)


def test_an_overlong_message_gets_the_limit_and_no_generation(demo, demo_url, monkeypatch):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    answered = []
    answer = demo.answer
    monkeypatch.setattr(demo, "answer", lambda *args: answered.append(args) or answer(*args))
    client = Client(demo_url, verbose=False, analytics_enabled=False)
    _, history, _ = client.predict("hi there!", api_name="/send")
    assert len(history) == 2 and len(answered) == 1
    limit = MAX_MESSAGE_CHARS
    with pytest.raises(AppError, match=f"The message has {limit + 1} characters; the limit is {limit}. Shorten it."):
        client.predict("x" * (limit + 1), api_name="/send")
    assert len(answered) == 1  # the model never saw it
    _, history, _ = client.predict("y" * limit, api_name="/send")  # at the limit: answered, after the first reply
    assert len(history) == 4 and history[2]["content"][0]["text"] == "y" * limit
    client.close()


def test_web_command_passes_its_limits(monkeypatch, capsys):
    served = []
    monkeypatch.setattr("persona.__main__.serve", lambda *args, **limits: served.append(limits))
    cli(["web"])
    cli(["web", "--queue-size", "5", "--max-message-chars", "80"])
    assert served == [{"queue_size": QUEUE_SIZE, "max_message_chars": MAX_MESSAGE_CHARS},
                      {"queue_size": 5, "max_message_chars": 80}]
    with pytest.raises(SystemExit) as exit_info:
        cli(["web", "--queue-size", "0"])
    assert exit_info.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_the_load_script_stays_on_loopback(capsys):
    for url in ("http://127.0.0.1:7860", "http://localhost:7860", "http://[::1]:7860"):
        check_loopback(url)
    assert loadtest(["--url", "http://10.1.2.3:7860", "--chats", "1"]) == 2
    assert "10.1.2.3 is not a loopback address" in capsys.readouterr().err


def test_the_summary_counts_and_ranks_latencies():
    outcomes = [Outcome("ok", float(seconds)) for seconds in range(1, 21)]
    outcomes += [Outcome("refused", 0.01, "Queue is full!"), Outcome("failed", 0.5, "AppError: boom")]
    summary = summarize(outcomes, 10.0)
    assert (summary["sent"], summary["succeeded"], summary["refused"], summary["failed"]) == (22, 20, 1, 1)
    assert (summary["p50_s"], summary["p95_s"], summary["max_s"], summary["throughput"]) == (10.0, 19.0, 20.0, 2.0)
    assert summary["first_error"] == "AppError: boom"


@needs_browser
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

    box.send_keys("x" * (MAX_MESSAGE_CHARS + 1))
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: f"the limit is {MAX_MESSAGE_CHARS}. Shorten it." in d.find_element(By.TAG_NAME, "body").text)
    assert box.get_attribute("value") == "x" * (MAX_MESSAGE_CHARS + 1)  # kept, to be shortened
