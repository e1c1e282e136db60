"""The search page in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium)
against a real uvicorn server: type a query, see the right demo images, click one to search by it,
filter with SQL, see errors as messages."""

from __future__ import annotations

import math
import os
import shutil
import socket
import tempfile
import threading
import time

import pytest
import uvicorn

from server import ServeConfig, create_app

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1280,900"]
KEY = "page-key"

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    if os.environ.get("CI"):  # CI installs them (.ci/run): never skip the browser test there
        raise RuntimeError(f"{CHROMIUM} and {CHROMEDRIVER} are needed: apt-get install chromium chromium-driver")
    pytest.skip("headless Chromium not installed (apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def base_url(served_library):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(ServeConfig(store=served_library[0], port=port, api_key=KEY))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="clipdex-chromium-")
    for flag in BROWSER_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def cards(browser):
    return browser.find_elements(By.CSS_SELECTOR, "#results .hit")


def wait_for_status(browser, text):
    WebDriverWait(browser, 20).until(lambda b: text in b.find_element(By.ID, "status").text)
    return browser.find_element(By.ID, "status")


def search(browser, text, where=""):
    for field, value in (("q", text), ("where", where)):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()


def test_search_page_end_to_end(browser, base_url, served_library):
    truth = {row["path"]: row for row in served_library[1]}
    browser.get(base_url + "/")
    assert "API key" in browser.page_source  # the key page first
    browser.find_element(By.NAME, "key").send_keys(KEY + "\n")
    WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.ID, "q"))

    colour, shape = served_library[1][0]["colour"], served_library[1][0]["shape"]
    wanted = sum(1 for row in served_library[1] if (row["colour"], row["shape"]) == (colour, shape))
    search(browser, f"a {colour} {shape}")
    wait_for_status(browser, "results for")
    shown = cards(browser)
    assert len(shown) == 24
    top = [truth[card.get_attribute("data-path")] for card in shown[:wanted]]
    assert [(row["colour"], row["shape"]) for row in top] == [(colour, shape)] * wanted
    first = shown[0].find_element(By.TAG_NAME, "img")
    WebDriverWait(browser, 20).until(lambda b: b.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth > 0", first))  # the thumbnail loaded

    clicked = shown[5]
    clicked_id, clicked_name = clicked.get_attribute("data-id"), clicked.get_attribute("data-path").split("/")[-1]
    clicked.click()
    wait_for_status(browser, f"like {clicked_name}")
    assert cards(browser)[0].get_attribute("data-id") == clicked_id  # an image is its own nearest neighbour

    search(browser, "a shape", where="width > 400")
    wait_for_status(browser, 'results for "a shape"')
    widths = [int(card.find_element(By.CLASS_NAME, "score").text.split("·")[1].split("×")[0]) for card in cards(browser)]
    assert widths and all(width > 400 for width in widths)

    example = served_library[1][2]["path"]
    browser.find_element(By.ID, "where").clear()
    chooser = browser.find_element(By.ID, "upload")
    browser.execute_script("arguments[0].style.display = 'block'", chooser)  # hidden behind its label
    chooser.send_keys(example)
    wait_for_status(browser, "results for " + example.split("/")[-1])
    assert cards(browser)[0].get_attribute("data-path") == example  # searching by a file finds it first

    search(browser, "a shape", where="widht >>> 3")
    status = WebDriverWait(browser, 20).until(lambda b: b.find_element(By.CSS_SELECTOR, "#status.error"))
    assert "invalid where filter" in status.text


def test_the_page_s_min_score_slider_and_sort_choice(browser, base_url):
    browser.get(base_url + "/?key=" + KEY)
    WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.ID, "q"))

    def shown_scores():
        return [float(card.find_element(By.CLASS_NAME, "score").text.split("·")[0]) for card in cards(browser)]

    search(browser, "a shape")
    wait_for_status(browser, 'results for "a shape"')
    everything = shown_scores()
    cut = math.ceil(everything[-1] * 100 + 1) / 100  # a slider step above the last shown, below the best
    assert cut <= everything[0]
    slider = browser.find_element(By.ID, "min-score")
    browser.execute_script(f"arguments[0].value = '{cut}'; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert float(browser.find_element(By.ID, "min-score-value").text) == cut
    search(browser, "a shape ")
    wait_for_status(browser, 'results for "a shape "')
    scores = shown_scores()
    assert scores and len(scores) < len(everything) and all(score >= cut for score in scores)
    browser.find_element(By.CSS_SELECTOR, "#sort option[value='-width']").click()
    search(browser, "a shape")
    wait_for_status(browser, 'results for "a shape"')
    meta = [card.find_element(By.CLASS_NAME, "score").text for card in cards(browser)]
    widths = [int(text.split("·")[1].split("×")[0]) for text in meta]
    assert meta and all(float(text.split("·")[0]) >= cut for text in meta)
    assert widths == sorted(widths, reverse=True)
    browser.execute_script("arguments[0].value = '0'; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert browser.find_element(By.ID, "min-score-value").text == "off"


def test_the_page_s_words_toggle_searches_the_captions_too(browser, base_url):
    browser.get(base_url + "/?key=" + KEY)
    WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.ID, "q"))
    browser.find_element(By.CSS_SELECTOR, "#k option:nth-child(1)").click()  # 12 results

    def top_captions(text):
        search(browser, text)
        wait_for_status(browser, f'results for "{text}"')
        return [card.find_element(By.CLASS_NAME, "caption").text for card in cards(browser)[:5]]

    by_picture = top_captions("top right")
    browser.find_element(By.ID, "hybrid").click()
    with_words = top_captions("top right ")
    assert sum("top right" in caption for caption in with_words) >= 3
    assert sum("top right" in caption for caption in with_words) > sum("top right" in c for c in by_picture)


def test_the_page_shows_duplicate_groups_with_the_keeper_outlined(browser, tmp_path):
    from demo.shapes import write_library
    from indexer.run import IndexConfig, index_paths

    library = tmp_path / "library"
    write_library(library, 12, 5)
    first = sorted(library.rglob("*.png"))[0]
    shutil.copy(first, library / "again.png")
    index_paths([library], tmp_path / "store", IndexConfig(model="clipdex-shapes", device="cpu", progress=False))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(ServeConfig(store=tmp_path / "store", port=port)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        browser.get(f"http://127.0.0.1:{port}/")
        WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.ID, "dupes"))
        browser.find_element(By.ID, "dupes").click()
        wait_for_status(browser, "of duplicates")
        groups = browser.find_elements(By.CSS_SELECTOR, "#results .group")
        exact = [g for g in groups if "the same file" in g.find_element(By.TAG_NAME, "h2").text]
        assert len(exact) == 1
        shown = {card.get_attribute("data-path") for card in exact[0].find_elements(By.CSS_SELECTOR, ".hit")}
        assert shown == {str(first), str(library / "again.png")}
        assert len(exact[0].find_elements(By.CSS_SELECTOR, ".hit.keep")) == 1
    finally:
        server.should_exit = True
        thread.join(timeout=10)
