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
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = os.environ.get("ISEARCH_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ISEARCH_CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL = ("install them with: apt-get install -y chromium chromium-driver && "
           ".venv/bin/pip install selenium fastapi uvicorn python-multipart")
from conftest import SERVER_OBJECTS as N_OBJECTS, build_server_index as build_index, served_index  # noqa: E402

pytestmark = pytest.mark.slow  # its module fixture alone takes seconds (pytest --durations)
SERVER_LIFETIME_S = 240  # the server subprocess is killed after this, whatever happens to the test




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
    with served_index(root, 4 * N_OBJECTS, SERVER_LIFETIME_S, root.parent / "server.log") as (port, _proc):
        yield {"url": f"http://127.0.0.1:{port}", "photos": photos, "root": root}


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

    def delete(path: str, headers: dict) -> int:
        req = urllib.request.Request(server["url"] + path, headers=headers, method="DELETE")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert delete("/api/images/0", {"Origin": "http://evil.example"}) == 403  # removal: the uploads' origin check
    assert delete("/api/images/0", {"Origin": "null"}) == 403
    assert delete("/api/images/0", {"Host": "evil.example"}) == 400


# ------------------------------------------------------------------------------------------------ issue 15 flows
def _shot(drv, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    drv.save_screenshot(str(ARTIFACTS / f"browser-{name}.png"))


def _open(drv, url: str, width: int = 1400, height: int = 1000) -> None:
    from selenium.webdriver.common.by import By

    drv.set_window_size(width, height)
    drv.get(url)
    _wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, "#picks button"), "the indexed thumbnails")


def _select(drv, element_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(drv.find_element("id", element_id)).select_by_value(value)


def _set(drv, element_id: str, value: str) -> None:
    e = drv.find_element("id", element_id)
    e.clear()
    e.send_keys(value)


def _upload(drv, path: Path) -> None:
    seq = _seq(drv)
    drv.find_element("id", "file").send_keys(str(path))
    _wait(drv, lambda d: _seq(d) > seq, f"the results for {path.name}")


def _text(drv, element_id: str) -> str:
    return drv.find_element("id", element_id).text


def _js_file(var: str, url: str, name: str, kind: str) -> str:
    """JS that fetches ``url`` into a File ``var`` named ``name`` of MIME type ``kind`` (then the caller's code)."""
    return (f"const __r = await fetch({json.dumps(url)}); const __b = await __r.blob(); "
            f"const {var} = new File([__b], {json.dumps(name)}, {{type: {json.dumps(kind)}}});")


def test_coarse_to_fine_aml_from_the_page(server, driver):
    """aml-c2f is offered on the page and localises every re-ranked result."""
    from selenium.webdriver.common.by import By

    drv, photos = driver, server["photos"]
    _open(drv, server["url"] + "/")
    _select(drv, "rerank", "aml-c2f")
    _set(drv, "top", "4")
    _upload(drv, photos / "ukbench00004.jpg")
    hits = _results(drv)
    assert hits[0]["name"] == "ukbench00004.jpg", hits
    boxes = drv.find_elements(By.CSS_SELECTOR, "#results .hit .box")
    assert len(boxes) == 4 and all(b.size["width"] > 5 and b.size["height"] > 5 for b in boxes)
    assert "aml-c2f on the top 100" in _text(drv, "timings")


def test_rerank_boxes_viewer_export_and_load_more(server, driver):
    """aml-fast from the page draws a box on every re-ranked result; a result opens full size with its box,
    score and a link to the file; "load more" asks for more; the ranked list exports as JSON and CSV."""
    from selenium.webdriver.common.by import By

    drv, photos = driver, server["photos"]
    _open(drv, server["url"] + "/")
    _select(drv, "rerank", "aml-fast")
    _set(drv, "top", "4")
    # while a query runs the old results are dimmed and the spinner shows (recorded as the classes change)
    drv.execute_script("window.__busy = []; new MutationObserver(() => window.__busy.push(["
                       "document.getElementById('results').classList.contains('busy'),"
                       "document.getElementById('spinner').classList.contains('on')])).observe(document.body, "
                       "{attributes: true, subtree: true, attributeFilter: ['class']});")
    _upload(drv, photos / "ukbench00004.jpg")
    busy = drv.execute_script("return window.__busy")
    assert [True, True] in busy and busy[-1] == [False, False], busy
    hits = _results(drv)
    assert hits[0]["name"] == "ukbench00004.jpg", hits
    boxes = drv.find_elements(By.CSS_SELECTOR, "#results .hit .box")
    assert len(boxes) == 4 and all(b.size["width"] > 5 and b.size["height"] > 5 for b in boxes)
    timings = _text(drv, "timings")
    for stage in ("aml-fast on the top 100", "decode", "network", "search", "re-rank", "QE", "server"):
        assert stage in timings, timings
    _shot(drv, "aml-fast-boxes")

    # full-size view of the second result
    drv.find_elements(By.CSS_SELECTOR, "#results .hit .pic")[1].click()
    _wait(drv, lambda d: d.execute_script("const i = document.getElementById('v-img'); return "
                                          "document.getElementById('viewer').open && i.complete && i.naturalWidth > 0"),
          "the full-size image")
    nat = drv.execute_script("const i = document.getElementById('v-img'); return [i.naturalWidth, i.naturalHeight]")
    assert nat == [640, 480], nat
    assert drv.find_elements(By.CSS_SELECTOR, "#v-big .box") and "score" in _text(drv, "v-score")
    link = drv.find_element(By.ID, "v-link").get_attribute("href")
    assert link == f"{server['url']}/api/original/{hits[1]['id']}", link
    with urllib.request.urlopen(link, timeout=10) as r:
        assert r.read() == (photos / hits[1]["name"]).read_bytes()
    _shot(drv, "full-size-view")
    drv.find_element(By.ID, "v-close").click()
    assert not drv.execute_script("return document.getElementById('viewer').open")

    # export: the page builds the files from the last response
    got = drv.execute_async_script("""
        const done = arguments[arguments.length - 1]; const out = [];
        const orig = URL.createObjectURL;
        URL.createObjectURL = (b) => { out.push(b); return orig(b); };
        document.getElementById('export-json').click(); document.getElementById('export-csv').click();
        URL.createObjectURL = orig;
        Promise.all(out.map((b) => b.text())).then(done);""")
    data = json.loads(got[0])
    assert [h["name"] for h in data["hits"]] == [h["name"] for h in hits] and data["pipeline"]["rerank"] == "aml-fast"
    csv_lines = got[1].strip().split("\n")
    assert csv_lines[0] == "rank,id,name,score,x1,y1,x2,y2,relevant" and len(csv_lines) == 5
    assert csv_lines[1].startswith(f'1,{hits[0]["id"]},"ukbench00004.jpg",')

    # load more: 4 -> 16 results asked for (as many as there are)
    total = int(_text(drv, "stats").split()[0])
    seq = _seq(drv)
    drv.find_element(By.ID, "more").click()
    _wait(drv, lambda d: _seq(d) > seq, "more results")
    assert len(_results(drv)) == min(16, total) and drv.find_element(By.ID, "top").get_attribute("value") == "16"
    assert _results(drv)[:4] == hits
    _select(drv, "rerank", "aml")


def _exported(drv) -> dict:
    """The JSON the page's export button builds from its last response."""
    got = drv.execute_async_script("""
        const done = arguments[arguments.length - 1]; const out = [];
        const orig = URL.createObjectURL;
        URL.createObjectURL = (b) => { out.push(b); return orig(b); };
        document.getElementById('export-json').click();
        URL.createObjectURL = orig;
        out[0].text().then(done);""")
    return json.loads(got)


def test_casr_options_from_the_page(server, driver):
    """CA-SR from the page: its region-vector and QE-space choices show only with casr and reach the server (the
    pipeline of the response), every re-ranked result gets a box, and changing a choice searches again."""
    from selenium.webdriver.common.by import By

    drv, photos = driver, server["photos"]
    _open(drv, server["url"] + "/")
    assert not drv.find_element(By.ID, "casr-row").is_displayed()
    _set(drv, "top", "4")
    _select(drv, "rerank", "casr")
    assert drv.find_element(By.ID, "casr-row").is_displayed()
    _select(drv, "casr-vectors", "max")
    _upload(drv, photos / "ukbench00004.jpg")
    hits = _results(drv)
    assert hits[0]["name"] == "ukbench00004.jpg", hits
    assert len(drv.find_elements(By.CSS_SELECTOR, "#results .hit .box")) == 4
    assert "casr (max vectors) on the top 100" in _text(drv, "timings")
    pl = _exported(drv)["pipeline"]
    assert pl["rerank"] == "casr" and pl["rerank_options"] == {"vectors": "max"} and pl["qe_options"] == {}, pl
    _set(drv, "qe", "2")
    seq = _seq(drv)
    _select(drv, "qe-space", "global")  # a change searches again
    _wait(drv, lambda d: _seq(d) > seq, "the results with QE")
    pl = _exported(drv)["pipeline"]
    assert pl["qe"] == 2 and pl["qe_options"] == {"space": "global"} and pl["rerank_options"] == {"vectors": "max"}
    assert _results(drv)[0]["name"] == "ukbench00004.jpg"
    assert "QE with 2 in the global vectors" in _text(drv, "timings")
    _shot(drv, "casr-options")
    _select(drv, "rerank", "aml")
    assert not drv.find_element(By.ID, "casr-row").is_displayed()
    _set(drv, "qe", "0")


def test_picker_pages_filters_and_keyboard_only(server, driver):
    """The picker pages through the whole collection and filters by name; it is one tab stop with arrow keys
    inside; a box is typed into four fields and Enter searches."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    drv = driver
    _open(drv, server["url"] + "/?picks=5")
    total = int(_text(drv, "stats").split()[0])
    assert len(drv.find_elements(By.CSS_SELECTOR, "#picks button")) == 5
    assert _text(drv, "pick-count") == f"1–5 of {total}"
    drv.find_element(By.ID, "pick-next").click()
    _wait(drv, lambda d: _text(d, "pick-count") == f"6–10 of {total}", "the second page")
    _shot(drv, "picker-page-2")
    _set(drv, "pick-filter", "BENCH0000")
    _wait(drv, lambda d: _text(d, "pick-count").startswith("1–5 of 10 matching"), "the filtered list")
    assert [b.get_attribute("title") for b in drv.find_elements(By.CSS_SELECTOR, "#picks button")] == \
        [f"ukbench{i:05d}.jpg" for i in range(5)]
    drv.find_element(By.ID, "pick-next").click()
    _wait(drv, lambda d: _text(d, "pick-count").startswith("6–10 of 10"), "the filtered second page")
    assert drv.find_element(By.ID, "pick-next").get_attribute("disabled")
    _set(drv, "pick-filter", "")
    _wait(drv, lambda d: _text(d, "pick-count") == f"1–5 of {total}", "the unfiltered list")

    # keyboard only: the grid is one tab stop; arrows move; Enter picks
    drv.find_element(By.ID, "pick-filter").click()
    active = lambda: drv.switch_to.active_element  # noqa: E731
    active().send_keys(Keys.TAB)
    assert active().get_attribute("title") == "ukbench00000.jpg"
    assert [b.get_attribute("tabindex") for b in drv.find_elements(By.CSS_SELECTOR, "#picks button")] == \
        ["0", "-1", "-1", "-1", "-1"]
    active().send_keys(Keys.ARROW_RIGHT)
    active().send_keys(Keys.ARROW_RIGHT)
    assert active().get_attribute("title") == "ukbench00002.jpg"
    seq = _seq(drv)
    active().send_keys(Keys.ENTER)
    _wait(drv, lambda d: _seq(d) > seq, "the results of a keyboard pick")
    assert _results(drv)[0]["name"] == "ukbench00002.jpg"
    active().send_keys(Keys.TAB)  # out of the grid in one step
    assert active().tag_name != "button" or active().get_attribute("role") != "option"

    # a box typed in four fields (frame = the 512-px copy of a 640x480 photo: 512x384), Enter searches
    for k, v in zip(("bx1", "by1", "bx2", "by2"), ("80", "48", "432", "336")):
        _set(drv, k, v)
    seq = _seq(drv)
    drv.find_element(By.ID, "by2").send_keys(Keys.ENTER)
    _wait(drv, lambda d: _seq(d) > seq and d.find_element(By.ID, "results").get_attribute("data-box"),
          "the typed-box results")
    box = [float(v) for v in drv.find_element(By.ID, "results").get_attribute("data-box").split(",")]
    assert box == [100.0, 60.0, 540.0, 420.0], box
    assert _text(drv, "boxinfo").startswith("Box 80, 48, 432, 336")
    _shot(drv, "keyboard-box")
    # a bad typed box: the message sits beside the fields, and the next action clears it
    _set(drv, "bx2", "10")
    drv.find_element(By.ID, "bx2").send_keys(Keys.ENTER)
    assert "x2 must be larger than x1" in _text(drv, "box-error") and _text(drv, "error") == ""
    drv.find_element(By.ID, "clearbox").click()
    assert _text(drv, "box-error") == ""


def test_box_move_resize_paste_drop_and_errors(server, driver):
    """A drawn box can be moved by dragging inside it; pasting or dropping an image starts a query; a pasted
    non-image and a text file give a plain message beside the file input, cleared by the next action."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    drv, photos = driver, server["photos"]
    _open(drv, server["url"] + "/")
    _select(drv, "rerank", "none")
    _upload(drv, photos / "ukbench00004.jpg")
    canvas = drv.find_element(By.ID, "canvas")
    w, h = canvas.size["width"], canvas.size["height"]
    s = w / 640

    def drag(x1, y1, x2, y2):
        seq = _seq(drv)
        dx, dy = round((x2 - x1) * s), round((y2 - y1) * s)
        (ActionChains(drv).move_to_element_with_offset(canvas, round(x1 * s) - w // 2, round(y1 * s) - h // 2)
         .click_and_hold().move_by_offset(dx // 2, dy // 2).move_by_offset(dx - dx // 2, dy - dy // 2)
         .release().perform())
        _wait(drv, lambda d: _seq(d) > seq, "the results after a drag")
        return [float(v) for v in drv.find_element(By.ID, "results").get_attribute("data-box").split(",")]

    tol = 2 / s + 1
    b = drag(100, 60, 400, 300)
    assert all(abs(a - e) <= tol for a, e in zip(b, (100, 60, 400, 300))), b
    b = drag(250, 180, 310, 220)  # inside: moves by (60, 40)
    assert all(abs(a - e) <= tol for a, e in zip(b, (160, 100, 460, 340))), b
    b = drag(460, 340, 540, 420)  # bottom-right corner: resizes
    assert all(abs(a - e) <= tol for a, e in zip(b, (160, 100, 540, 420))), b
    _shot(drv, "box-moved-resized")

    # paste an image (a thumbnail fetched as a File): the page searches with it
    seq = _seq(drv)
    drv.execute_async_script("const done = arguments[arguments.length - 1]; (async () => {" +
                             _js_file("f", "/api/thumbnail/8?size=512", "pasted.jpg", "image/jpeg") +
                             "const dt = new DataTransfer(); dt.items.add(f);"
                             "document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true}));"
                             "done(); })();")
    _wait(drv, lambda d: _seq(d) > seq, "the results of a pasted image")
    names = [x["name"] for x in _results(drv)]
    assert names[0] == "ukbench00008.jpg" and drv.find_element(By.ID, "results").get_attribute("data-box") == ""
    _shot(drv, "paste")

    # drop an image file
    seq = _seq(drv)
    drv.execute_async_script("const done = arguments[arguments.length - 1]; (async () => {" +
                             _js_file("f", "/api/thumbnail/0?size=512", "dropped.jpg", "image/jpeg") +
                             "const dt = new DataTransfer(); dt.items.add(f);"
                             "document.getElementById('canvas-wrap').dispatchEvent(new DragEvent('drop', "
                             "{dataTransfer: dt, bubbles: true, cancelable: true})); done(); })();")
    _wait(drv, lambda d: _seq(d) > seq, "the results of a dropped image")
    assert _results(drv)[0]["name"] == "ukbench00000.jpg"

    # paste of text, not an image: a plain message beside the query, old results gone
    drv.execute_script("const dt = new DataTransfer(); dt.setData('text/plain', 'hello');"
                       "document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true}));")
    assert "not an image" in _text(drv, "error") and _results(drv) == []
    # a text file through the file input
    txt = server["root"].parent / "notes.txt"
    txt.write_text("not a photo")
    drv.find_element(By.ID, "file").send_keys(str(txt))
    _wait(drv, lambda d: "notes.txt" in _text(d, "error"), "the refusal of a text file")
    err = _text(drv, "error")
    assert "not an image" in err and "Error" not in err and "415" not in err, err
    # beside its cause: in the query panel, right under the image, not in the results panel
    assert drv.execute_script("const e = document.getElementById('error'); return e.closest('section')"
                              ".contains(document.getElementById('file')) && !document.getElementById('r-section')"
                              ".contains(e)")
    gap = drv.find_element(By.ID, "error").location["y"] - drv.find_element(By.ID, "file").location["y"]
    assert 0 < gap < 300, gap
    _shot(drv, "error-beside-cause")
    # a pasted GIF that is not one: the browser cannot show it, the message names it
    drv.execute_async_script("const done = arguments[arguments.length - 1]; (async () => {"
                             "const f = new File(['GIF89a not really'], 'fake.gif', {type: 'image/gif'});"
                             "const dt = new DataTransfer(); dt.items.add(f);"
                             "document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true}));"
                             "done(); })();")
    _wait(drv, lambda d: "not an image" in _text(d, "error") and "fake.gif" in _text(d, "error"), "the fake GIF")
    # an image the browser shows but the server cannot read (SVG): the server's 415 in plain words
    seq = _seq(drv)
    drv.execute_async_script("const done = arguments[arguments.length - 1]; (async () => {"
                             "const f = new File(['<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"200\" "
                             "height=\"150\"><rect width=\"200\" height=\"150\" fill=\"red\"/></svg>'], "
                             "'drawing.svg', {type: 'image/svg+xml'});"
                             "const dt = new DataTransfer(); dt.items.add(f);"
                             "document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true}));"
                             "done(); })();")
    _wait(drv, lambda d: _seq(d) > seq, "the server's answer to an SVG")
    err = _text(drv, "error")
    assert err.startswith("This file is not an image the server can read") and _results(drv) == [], err
    # the next action clears the message
    seq = _seq(drv)
    drv.find_element(By.CSS_SELECTOR, '#picks button[title="ukbench00001.jpg"]').click()
    _wait(drv, lambda d: _seq(d) > seq, "the results after the error")
    assert _text(drv, "error") == ""
    _select(drv, "rerank", "aml")


def test_narrow_width_scrolls_to_results(server, driver):
    from selenium.webdriver.common.by import By

    drv = driver
    _open(drv, server["url"] + "/", width=600, height=900)
    try:
        assert drv.execute_script("return window.scrollY") == 0
        seq = _seq(drv)
        drv.find_element(By.CSS_SELECTOR, '#picks button[title="ukbench00005.jpg"]').click()
        _wait(drv, lambda d: _seq(d) > seq, "the results at 600 px")
        _wait(drv, lambda d: d.execute_script(
            "const r = document.getElementById('r-section').getBoundingClientRect(); "
            "return window.scrollY > 0 && r.top >= -2 && r.top < window.innerHeight / 2"), "the scroll to the results")
        _shot(drv, "narrow-600px")
    finally:
        drv.set_window_size(1300, 1000)


def test_remove_image_from_the_page(server, driver):
    """The viewer's "Remove from index" (two clicks) takes the image out: its card, its thumbnail in the picker
    and one image from the count; asking for it again answers 404."""
    import urllib.error

    from selenium.webdriver.common.by import By

    drv = driver
    _open(drv, server["url"] + "/")
    _select(drv, "rerank", "none")
    before = int(_text(drv, "stats").split()[0])
    seq = _seq(drv)
    drv.find_element(By.CSS_SELECTOR, '#picks button[title="ukbench00006.jpg"]').click()
    _wait(drv, lambda d: _seq(d) > seq, "the results")
    victim = next(h for h in _results(drv) if h["name"] == "ukbench00007.jpg")
    card = drv.find_element(By.CSS_SELECTOR, f'#results .hit[data-id="{victim["id"]}"] .pic')
    card.click()
    _wait(drv, lambda d: d.execute_script("return document.getElementById('viewer').open"), "the viewer")
    drv.find_element(By.ID, "v-remove").click()
    assert _text(drv, "v-remove") == "Click again to remove"
    drv.find_element(By.ID, "v-remove").click()
    _wait(drv, lambda d: "was removed" in _text(d, "addmsg"), "the removal")
    _wait(drv, lambda d: _text(d, "stats").startswith(f"{before - 1} images"), "the new count")
    assert not drv.find_elements(By.CSS_SELECTOR, f'#results .hit[data-id="{victim["id"]}"]')
    assert not drv.find_elements(By.CSS_SELECTOR, '#picks button[title="ukbench00007.jpg"]')
    _shot(drv, "removed")
    try:
        urllib.request.urlopen(f"{server['url']}/api/original/{victim['id']}", timeout=10)
        raise AssertionError("the removed image is still served")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
    _select(drv, "rerank", "aml")
