"""Both pages in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
label with the mouse and with keyboard shortcuts, vote, and see the leaderboard change.
Screenshots are saved under tests/artifacts/web/ (or $PREFGYM_TEST_ARTIFACTS)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from prefgym.io import write_json
from prefgym.web import annotation_app, arena_app

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[test]')")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

ADMIN = "browser-admin-token-0123456789"
ARTIFACTS = Path(os.environ.get("PREFGYM_TEST_ARTIFACTS", Path(__file__).parent / "artifacts" / "web"))
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,900")


def serve(app):
    """Run `app` under uvicorn in a thread on a free loopback port; returns (base url, server)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {ARTIFACTS}")
    yield driver
    driver.quit()


def shot(driver, name):
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def press(driver, key):
    driver.find_element(By.TAG_NAME, "body").send_keys(key)


def wait_for(predicate, what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_label_with_mouse_and_keyboard(browser, tmp_path):
    pairs = [{"instruction": f"Name a colour, {i}.", "input": "", "output_1": f"Blue ({i}).",
              "output_2": f"Green ({i})."} for i in range(4)]
    write_json(tmp_path / "pairs.json", pairs)
    app = annotation_app(tmp_path / "db.sqlite", tmp_path / "pairs.json", admin_token=ADMIN,
                         guidelines="Pick the answer that follows the instruction better.")
    base, server = serve(app)
    try:
        token = app.state.store.create_token("ann", "labeler")
        browser.get(f"{base}/annotate?token={token}")
        assert browser.current_url == f"{base}/annotate"  # the token left the address bar
        assert "Pick the answer that follows the instruction better." in browser.page_source
        shot(browser, "annotate")
        # label 1 with the mouse, 2 with keys (2 = right, then t = tie), remembering what was shown
        expected = []
        for action in ("click-left", "2", "t"):
            index = int(browser.find_element(By.NAME, "index").get_attribute("value"))
            left, right = browser.find_element(By.ID, "left").text, browser.find_element(By.ID, "right").text
            before = browser.find_element(By.CLASS_NAME, "progress").text
            if action == "click-left":
                browser.find_element(By.CSS_SELECTOR, "button[value=left]").click()
                picked = left
            else:
                press(browser, action)
                picked = None if action == "t" else right
            wait_for(lambda: browser.find_elements(By.CLASS_NAME, "progress")
                     and browser.find_element(By.CLASS_NAME, "progress").text != before, "the next pair")
            expected.append((index, 1.5 if picked is None else 1.0 if picked == pairs[index]["output_1"] else 2.0))
        rows = app.state.annotation.export()
        assert [(r["index"], r["preference"]) for r in rows] == expected
        assert all(r["annotator"] == "ann" and r["time_per_example"] >= 0 for r in rows)
        assert "3 / 4 labels done (3 by you, ann)" in browser.page_source
        # the admin page, entered through the admin link
        browser.get(f"{base}/admin?token={ADMIN}")
        assert "ann" in browser.find_element(By.TAG_NAME, "table").text
        shot(browser, "admin")
    finally:
        server.should_exit = True
        browser.delete_all_cookies()


def test_vote_and_see_the_leaderboard_change(browser, tmp_path):
    paths = []
    for gen in ("alpha", "beta", "gamma"):
        path = tmp_path / f"{gen}.json"
        write_json(path, [{"instruction": f"Write a haiku about {t}.", "input": "", "output": f"[{gen}] on {t}",
                           "generator": gen} for t in ("rain", "snow", "wind")])
        paths.append(path)
    app = arena_app(tmp_path / "db.sqlite", paths, admin_token=ADMIN, n_bootstrap=10)
    base, server = serve(app)
    try:
        token = app.state.store.create_token("v", "voter")
        browser.get(f"{base}/battle?token={token}")
        assert "alpha" not in browser.find_element(By.TAG_NAME, "form").text
        shot(browser, "battle")

        def vote_for(gen):
            """Vote for `gen` (by keyboard: a / b) or tie (mouse) when it is not in the battle."""
            a = browser.find_element(By.ID, "output-a").text
            b = browser.find_element(By.ID, "output-b").text
            if f"[{gen}]" in a:
                press(browser, "a")
            elif f"[{gen}]" in b:
                press(browser, "b")
            else:
                browser.find_element(By.CSS_SELECTOR, "button[value=tie]").click()
            wait_for(lambda: browser.find_elements(By.ID, "reveal"), "the names to be revealed")

        vote_for("gamma")
        shot(browser, "revealed")
        browser.find_element(By.ID, "next").click()  # mouse
        vote_for("gamma")
        press(browser, "n")  # keyboard: next battle
        wait_for(lambda: browser.find_elements(By.ID, "output-a"), "the next battle")
        browser.get(f"{base}/leaderboard")
        assert browser.find_element(By.ID, "n-battles").text == "2 battles"
        first = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "td.model")]
        for _ in range(6):  # now alpha wins every battle it is in
            browser.get(f"{base}/battle")
            vote_for("alpha")
        browser.get(f"{base}/leaderboard")
        assert browser.find_element(By.ID, "n-battles").text == "8 battles"
        board = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "td.model")]
        shot(browser, "leaderboard")
        assert board[0] == "alpha" and board != first
        assert len(app.state.store.battles()) == 8
    finally:
        server.should_exit = True
        browser.delete_all_cookies()
