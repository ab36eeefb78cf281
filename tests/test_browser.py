"""The search page in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by Selenium):
upload a UKBench photo through the file input, draw a box with the mouse, see the other views of the object
in the top 4; pick an indexed image; add an image through the page. The server is the real ``serve()`` in a
subprocess on 127.0.0.1 with a bounded lifetime. A screenshot goes to tests/artifacts/.

Needs: ``apt-get install -y chromium chromium-driver`` and ``pip install selenium``. Without them the test
FAILS (it does not skip): CI installs them.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = os.environ.get("ISEARCH_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ISEARCH_CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL = ("install them with: apt-get install -y chromium chromium-driver && "
           ".venv/bin/pip install selenium fastapi uvicorn python-multipart")
from conftest import SERVER_OBJECTS as N_OBJECTS, build_server_index as build_index  # noqa: E402
SERVER_LIFETIME_S = 240  # the server subprocess is killed after this, whatever happens to the test




def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser_tools():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        pytest.fail(f"the browser test needs {' and '.join(missing)}; {INSTALL}")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail(f"the browser test needs the selenium package; {INSTALL}")


@pytest.fixture(scope="module")
def server(browser_tools, ukbench, tmp_path_factory):
    """``serve()`` on a copy of the shared index (the page adds an image to it) in a subprocess."""
    photos, shared = build_index(ukbench, tmp_path_factory)
    root = tmp_path_factory.mktemp("browser") / "index"
    shutil.copytree(shared, root)
    port = _free_port()
    code = ("import sys; from instance_search.server import serve; "
            "serve(sys.argv[1], host='127.0.0.1', port=int(sys.argv[2]), ground_truth='ukbench', "
            "log_level='warning')")
    log = open(root.parent / "server.log", "wb")
    proc = subprocess.Popen(["timeout", "-k", "5", str(SERVER_LIFETIME_S), sys.executable, "-c", code, str(root),
                             str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/api/stats", timeout=2) as r:
                    assert json.load(r)["images"] == 4 * N_OBJECTS
                break
            except (OSError, ValueError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"the server did not start: {(root.parent / 'server.log').read_text()[-2000:]}")
                time.sleep(0.3)
        yield {"url": url, "photos": photos, "root": root}
    finally:
        proc.terminate()  # timeout forwards SIGTERM to the server
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


@pytest.fixture(scope="module")
def driver(browser_tools, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download anything
    profile = tmp_path_factory.mktemp("chromium-profile")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--disable-dev-shm-usage", "--window-size=1300,1000",
                 f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(30)
    drv.set_script_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()


def _wait(drv, cond, what: str, timeout: float = 60):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(drv, timeout, poll_frequency=0.2).until(lambda d: cond(d))
    except TimeoutException:
        err = drv.find_element("id", "error").text
        pytest.fail(f"timed out waiting for {what}; page error: {err!r}")


def _results(drv) -> list[dict]:
    return drv.execute_script(
        "return [...document.querySelectorAll('#results .hit')].map(e => ({id: +e.dataset.id, "
        "name: e.dataset.name, rank: +e.dataset.rank, score: +e.dataset.score, cls: e.className}));")


def _seq(drv) -> int:
    return int(drv.find_element("id", "results").get_attribute("data-seq") or 0)


def test_page_upload_box_pick_and_add(server, driver):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    drv, photos = driver, server["photos"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        drv.get(server["url"] + "/")
        _wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#picks button")) == 4 * N_OBJECTS,
              "the indexed thumbnails")
        assert "12 images" in drv.find_element(By.ID, "stats").text
        top = drv.find_element(By.ID, "top")
        top.clear()
        top.send_keys("4")

        # 1. upload a photo: the page searches with the whole image
        drv.find_element(By.ID, "file").send_keys(str(photos / "ukbench00004.jpg"))
        _wait(drv, lambda d: _seq(d) >= 1, "the first results")
        names = [h["name"] for h in _results(drv)]
        assert len(names) == 4 and names[0] == "ukbench00004.jpg", names
        assert {"ukbench00005.jpg", "ukbench00006.jpg", "ukbench00007.jpg"} <= set(names), names
        assert "P@4 1.00" in drv.find_element(By.ID, "precision").text

        # 2. draw a box with the mouse (image pixels 100,60 → 540,420 of 640x480), the page searches again
        canvas = drv.find_element(By.ID, "canvas")
        w, h = canvas.size["width"], canvas.size["height"]
        assert abs(w / h - 640 / 480) < 0.02, (w, h)
        x1, y1, x2, y2 = (round(100 / 640 * w), round(60 / 480 * h), round(540 / 640 * w), round(420 / 480 * h))
        seq = _seq(drv)
        (ActionChains(drv)
         .move_to_element_with_offset(canvas, x1 - w // 2, y1 - h // 2).click_and_hold()
         .move_by_offset((x2 - x1) // 2, (y2 - y1) // 2).move_by_offset((x2 - x1) - (x2 - x1) // 2,
                                                                        (y2 - y1) - (y2 - y1) // 2)
         .release().perform())
        _wait(drv, lambda d: _seq(d) > seq and d.find_element(By.ID, "results").get_attribute("data-box"),
              "the box search results")
        box = [float(v) for v in drv.find_element(By.ID, "results").get_attribute("data-box").split(",")]
        assert all(abs(a - b) <= 640 / w * 2 + 1 for a, b in zip(box, (100, 60, 540, 420))), box
        assert drv.find_element(By.ID, "boxinfo").text.startswith("Box ")
        hits = _results(drv)
        names = [h["name"] for h in hits]
        assert len(names) == 4 and {"ukbench00005.jpg", "ukbench00006.jpg", "ukbench00007.jpg"} <= set(names), names
        assert all(h["cls"] == "hit rel" for h in hits if h["name"] != "ukbench00004.jpg")
        assert "search" in drv.find_element(By.ID, "timings").text
        drv.save_screenshot(str(ARTIFACTS / "browser-box-search.png"))

        # 3. pick an indexed image as the query
        seq = _seq(drv)
        drv.find_element(By.CSS_SELECTOR, '#picks button[title="ukbench00009.jpg"]').click()
        _wait(drv, lambda d: _seq(d) > seq, "the results for a picked image")
        names = [h["name"] for h in _results(drv)]
        assert names[0] == "ukbench00009.jpg" and {"ukbench00008.jpg", "ukbench00010.jpg", "ukbench00011.jpg"} \
            <= set(names), names
        assert drv.find_element(By.ID, "results").get_attribute("data-box") == ""

        # 4. add an image to the collection through the page
        drv.find_element(By.ID, "add-files").send_keys(str(photos / "ukbench00012.jpg"))
        drv.find_element(By.ID, "add").click()
        _wait(drv, lambda d: "13 images indexed" in d.find_element(By.ID, "addmsg").text, "the upload")
        assert "1 added" in drv.find_element(By.ID, "addmsg").text
        _wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#picks button")) == 13, "the new thumbnail")
        assert (server["root"] / "uploads" / "ukbench00012.jpg").is_file()
        assert drv.find_element(By.ID, "error").text == ""
        severe = [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
        assert not severe, severe
    finally:
        drv.save_screenshot(str(ARTIFACTS / "browser-final.png"))


def test_serve_refuses_foreign_hosts_and_origins(server):
    """``serve()`` on a loopback address answers only to loopback Host names (DNS rebinding) and refuses
    cross-origin POSTs (another site's page must not add images to a local index)."""
    import urllib.error

    def status(path: str, headers: dict, data: bytes | None = None) -> int:
        req = urllib.request.Request(server["url"] + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    port = server["url"].rsplit(":", 1)[1]
    assert status("/api/stats", {"Host": f"localhost:{port}"}) == 200
    assert status("/api/stats", {"Host": "evil.example"}) == 400
    assert status("/", {"Host": f"evil.example:{port}"}) == 400
    form = {"Content-Type": "multipart/form-data; boundary=b"}
    body = b'--b\r\nContent-Disposition: form-data; name="query_id"\r\n\r\n0\r\n--b--\r\n'
    assert status("/api/search", {**form, "Origin": "http://evil.example"}, body) == 403
    assert status("/api/search", {**form, "Origin": "null"}, body) == 403
    assert status("/api/images", {**form, "Origin": "http://evil.example"}, body) == 403
