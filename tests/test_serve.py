"""`ssl-vit serve`: the real server on a free loopback port, called over HTTP. Self-queries come back first with score
~1 and equal `ssl-vit index query`; each bad input gets its 4xx with one line of JSON and the server keeps
answering; thumbnails are re-encoded from one ranged read; concurrent uploads share embedding batches; a killed
embedding process fails only its batch and is started again. The page in a real headless browser: the
distribution's Chromium (/usr/bin/chromium) driven by Selenium through /usr/bin/chromedriver (never a browser or
driver Selenium downloads itself): upload a bundled test image, wait for the grid of k results with scores and
thumbnails, click one to search with it, save a screenshot."""
import concurrent.futures
import contextlib
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import torch
from PIL import Image

from ssl_vit.cli import main
from ssl_vit.data.samples import IMAGE_KEYS, read_shard
from ssl_vit.data.sources import expand_source
from ssl_vit.eval.retrieval import RetrievalIndex
from ssl_vit.models.backbone import BackboneSpec, create_backbone
from ssl_vit.models.export import export_backbone
from ssl_vit.serve.embedder import EmbedderStopped, EmbedProcess
from ssl_vit.serve.engine import decode_upload

UPLOAD_LIMIT_MB = 2


def start_server(index: Path, *extra: str):
    """(process, base URL) of `ssl-vit serve` on a free loopback port (port 0: the server prints the one it got)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ssl_vit.cli", "serve", "--index", str(index), "--port", "0",
                             "--max-upload-mb", str(UPLOAD_LIMIT_MB), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # "serving index ... at http://127.0.0.1:PORT/"
    if not line.startswith("serving index"):
        proc.kill()
        raise AssertionError(f"server did not start: {line}{proc.stderr.read()[-3000:]}")
    return proc, line.rsplit(" at ", 1)[1].strip().rstrip("/")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def served(tmp_path_factory, test_shards):
    """An index of the test shards' features (tiny ViT) and the server over it: (root, base URL)."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    spec = BackboneSpec(img_size=32, patch_size=4, kwargs=dict(depth=2, embed_dim=64, num_heads=2))
    backbone = export_backbone(create_backbone(spec), spec, root / "backbone.safetensors")
    assert main(["features", "--backbone", str(backbone), "--shards", str(test_shards), "--out", str(root / "feats"),
                 "--workers", "1", "--no-progress"]) == 0
    assert main(["index", "build", "--features", str(root / "feats"), "--out", str(root / "ix")]) == 0
    proc, url = start_server(root / "ix", "--batch-window-ms", "100")
    yield root, url
    stop_server(proc)


def request(url: str, method: str = "GET", path: str = "/", body: bytes = b"", headers=None):
    """(status, headers, body bytes) of one HTTP request."""
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def multipart(data: bytes, field: str = "image", filename: str = "q.jpg"):
    boundary = "ssl-vit-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def search(url: str, data: bytes | None = None, **params):
    body, headers = multipart(data) if data is not None else (b"", {})
    status, _, payload = request(url, "POST", "/search?" + urllib.parse.urlencode(params), body, headers)
    return status, json.loads(payload)


def stored_sample(test_shards, position: int):
    sample = read_shard(expand_source(str(test_shards)).urls[0])[position]
    return sample[next(k for k in IMAGE_KEYS if k in sample)], sample["__key__"]


def table_of(out: str) -> list:
    """[(key, score)] of the one query table `ssl-vit index query` printed."""
    rows = [line.split() for line in out.splitlines()[2:]]
    return [(row[3], float(row[1])) for row in rows if row and row[0].isdigit()]


def test_self_query_comes_first_and_equals_index_query(served, test_shards, tmp_path, capsys):
    root, url = served
    data, key = stored_sample(test_shards, 4)
    status, body = search(url, data, k=5)
    assert status == 200, body
    assert body["results"][0]["key"] == key and body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert all(r["class"] for r in body["results"]) and body["results"][0]["image"] == f"/images/{key}"
    path = tmp_path / "q.jpg"
    path.write_bytes(data)
    capsys.readouterr()
    assert main(["index", "query", "--index", str(root / "ix"), "--image", str(path), "-k", "5"]) == 0
    cli = table_of(capsys.readouterr().out)
    assert [r["key"] for r in body["results"]] == [k for k, _ in cli]
    assert [round(r["score"], 4) for r in body["results"]] == pytest.approx([s for _, s in cli], abs=1e-4)

    status, by_key = search(url, key=key, k=5, nprobe=3)  # nprobe is accepted (and unused) by a flat index
    assert status == 200 and by_key["results"][0]["key"] == key
    assert by_key["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_bad_inputs_get_their_4xx_and_the_server_keeps_answering(served, test_shards):
    root, url = served
    before = {p.name: p.stat().st_mtime_ns for p in (root / "ix").iterdir()}
    data, key = stored_sample(test_shards, 9)
    huge = io.BytesIO()
    Image.new("1", (7100, 7100)).save(huge, format="PNG")  # 50.4 megapixels in a few kB
    cases = {
        "not an image": (b"just some text, not an image", {}, 400, "not an image"),
        "truncated JPEG": (data[:-150], {}, 400, "cannot be decoded"),  # header intact, scan cut short
        "50 megapixels": (huge.getvalue(), {}, 413, "50.4 megapixels"),
        "empty body": (None, {}, 400, "empty upload"),
        "unknown key": (None, {"key": "no-such-key"}, 404, "no image with key 'no-such-key'"),
        "k = 0": (data, {"k": 0}, 422, "k: Input should be greater than or equal to 1"),
        "k = 1001": (data, {"k": 1001}, 422, "k: Input should be less than or equal to 1000"),
        "k not a number": (data, {"k": "ten"}, 422, "k: "),
        "efSearch = 0": (data, {"efSearch": 0}, 422, "efSearch: Input should be greater than or equal to 1"),
    }
    for name, (payload, params, code, message) in cases.items():
        if payload is None and "key" not in params:
            status, _, raw = request(url, "POST", "/search", b"")
        else:
            status, _, raw = request(url, "POST", "/search?" + urllib.parse.urlencode(params),
                                     *multipart(payload) if payload is not None else (b"", {}))
        assert status == code, (name, raw)
        assert raw.count(b"\n") == 0 and message in json.loads(raw)["error"], (name, raw)

    # over the upload limit: refused from the header before the body is sent...
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    conn.putrequest("POST", "/search")
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Content-Length", str(UPLOAD_LIMIT_MB * 2 ** 20 + 1))
    conn.endheaders()  # the body never comes: the answer must not wait for it
    response = conn.getresponse()
    assert response.status == 413 and "upload limit" in json.loads(response.read())["error"]
    conn.close()
    # ...and, without a length (chunked), as soon as the bytes received pass the limit (the end never comes)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    conn.putrequest("POST", "/search")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for _ in range(4 * UPLOAD_LIMIT_MB + 1):  # 256 kB chunks: one past the limit
        conn.send(b"40000\r\n" + b"y" * 2 ** 18 + b"\r\n")
    response = conn.getresponse()
    assert response.status == 413 and "more than" in json.loads(response.read())["error"]
    conn.close()

    for path in ("/images/no-such-key", "/images/../../etc/passwd", "/images/%2e%2e%2fmeta.json"):
        status, _, raw = request(url, "GET", path)
        assert status == 404 and "error" in json.loads(raw), path
    status, body = search(url, data, k=3)  # still answering, with the right answer
    assert status == 200 and body["results"][0]["key"] == key
    assert request(url, "GET", "/healthz")[0] == 200
    assert {p.name: p.stat().st_mtime_ns for p in (root / "ix").iterdir()} == before  # nothing written there


def test_a_raw_image_body_searches_as_the_multipart_upload_does(served, test_shards):
    _, url = served
    data, key = stored_sample(test_shards, 7)
    status, _, raw = request(url, "POST", "/search?k=3", data, {"Content-Type": "image/jpeg"})
    assert status == 200, raw
    assert json.loads(raw)["results"] == search(url, data, k=3)[1]["results"]
    assert json.loads(raw)["results"][0]["key"] == key


def test_thumbnails_are_re_encoded_from_one_ranged_read(served, test_shards):
    _, url = served
    member, key = stored_sample(test_shards, 2)
    status, headers, body = request(url, "GET", f"/images/{key}")
    assert status == 200 and headers["content-type"] == "image/jpeg" and headers["x-content-type-options"] == "nosniff"
    assert body != member  # re-encoded, never the member's own bytes
    with Image.open(io.BytesIO(body)) as thumb, Image.open(io.BytesIO(member)) as original:
        assert thumb.format == "JPEG" and thumb.size == original.size  # 32 px: below the thumbnail size


def test_concurrent_uploads_share_embedding_batches(served, test_shards):
    _, url = served
    samples = [(data, key, 1 + 3 * (i % 2)) for i, (data, key) in enumerate(stored_sample(test_shards, i)
                                                                             for i in range(10, 26))]
    status, before, _ = request(url, "GET", "/stats")
    before = json.loads(_)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # k = 1 and 4 mixed within the shared batches
        answers = list(pool.map(lambda s: search(url, s[0], k=s[2]), samples))
    assert [body["results"][0]["key"] for _, body in answers] == [key for _, key, _ in samples]
    assert [len(body["results"]) for _, body in answers] == [k for *_, k in samples]
    stats = json.loads(request(url, "GET", "/stats")[2])
    batches = stats["embed_batches"] - before["embed_batches"]
    assert stats["queries_served"] - before["queries_served"] == 16
    alone = [search(url, data, k=k)[1]["results"] for data, _, k in samples[:4]]  # each searched by itself
    assert [[r["key"] for r in body["results"]] for _, body in answers[:4]] == [[r["key"] for r in a] for a in alone]
    assert batches < 16  # at least two uploads shared one forward pass (100 ms window)
    assert stats["index"] == {"kind": "flat", "size": 1000, "dim": 64, "metric": "cosine", "params": {}}
    assert stats["latency_ms"]["p50"] <= stats["latency_ms"]["p99"]
    assert stats["torch_threads"]["threads"] == 1 and stats["torch_threads"]["source"] == "OMP_NUM_THREADS"


def test_without_an_image_table_thumbnails_are_a_404_and_searches_work(served, tmp_path):
    root, _ = served
    assert main(["index", "build", "--features", str(root / "feats"), "--out", str(tmp_path / "ix"),
                 "--image-table", "no"]) == 0
    assert not (tmp_path / "ix" / "image_keys.npy").exists()
    proc, url = start_server(tmp_path / "ix")
    try:
        key = json.loads((root / "feats" / "keys.json").read_text())[3]
        status, _, raw = request(url, "GET", f"/images/{key}")
        assert status == 404 and "has no image table: not written (--image-table no)" in json.loads(raw)["error"]
        status, body = search(url, key=key, k=2)
        assert status == 200 and body["results"][0]["key"] == key and body["results"][0]["image"] is None
    finally:
        stop_server(proc)


def test_serve_refuses_a_missing_index_in_one_line(tmp_path, capsys):
    capsys.readouterr()
    assert main(["serve", "--index", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: retrieval index") and len(err.strip().splitlines()) == 1


def test_page_is_served(served):
    _, url = served
    status, headers, body = request(url, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'id="file"' in body and b"/search?k=" in body


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

needs_chromium = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                    reason="no /usr/bin/chromium and chromedriver (make install puts them there)")


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a browser or a driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    yield driver
    driver.quit()


@pytest.mark.slow
@needs_chromium
def test_page_in_chromium_shows_a_grid_of_k_results_and_a_click_searches_again(served, browser, test_shards,
                                                                               tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, url = served
    data, key = stored_sample(test_shards, 6)
    image = tmp_path / "query.jpg"
    image.write_bytes(data)
    k = 8
    browser.get(url + "/")
    box = browser.find_element(By.ID, "k")
    box.clear()
    box.send_keys(str(k))
    browser.find_element(By.ID, "file").send_keys(str(image))
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result")) == k)
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth > 0)"))
    cells = browser.find_elements(By.CSS_SELECTOR, ".result")
    scores = [float(c.find_element(By.CLASS_NAME, "score").text) for c in cells]
    assert scores == sorted(scores, reverse=True) and abs(scores[0] - 1.0) < 1e-3
    assert cells[0].get_attribute("data-key") == key
    assert all(c.find_element(By.CLASS_NAME, "label").text not in ("", "-") for c in cells)  # class names
    browser.save_screenshot(str(tmp_path / "serve_page.png"))
    assert (tmp_path / "serve_page.png").stat().st_size > 10_000

    second = cells[1].get_attribute("data-key")
    cells[1].click()  # search with that result
    wait.until(lambda d: "query: " + second in d.find_element(By.ID, "query").text)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result")) == k)
    assert browser.find_elements(By.CSS_SELECTOR, ".result")[0].get_attribute("data-key") == second
    assert browser.find_element(By.ID, "status").text == f"{k} results"


def wait_until_dead(pid: int) -> None:
    """Until `pid` is a zombie (dead, not yet reaped by its parent, the server) or gone."""
    stat = Path(f"/proc/{pid}/stat")
    while stat.exists():
        with contextlib.suppress(FileNotFoundError):
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        time.sleep(0.01)


def test_a_dead_embedding_process_is_started_again_and_one_killed_mid_batch_fails_that_batch_in_one_line(
        served, test_shards):
    root, url = served
    data, key = stored_sample(test_shards, 7)
    status, before = search(url, data, k=3)
    assert status == 200
    first = json.loads(request(url, path="/stats")[2])["embedder"]
    os.kill(first["pid"], signal.SIGKILL)
    wait_until_dead(first["pid"])
    status, after = search(url, data, k=3)  # the dead child is noticed before the batch is handed over
    stats = json.loads(request(url, path="/stats")[2])["embedder"]
    assert status == 200 and after["results"] == before["results"]
    assert stats["restarts"] == first["restarts"] + 1 and stats["pid"] != first["pid"]

    index = RetrievalIndex.load(root / "ix")  # killed with a batch in flight: that batch fails, in one line
    embedder = EmbedProcess(index.source, index.dim, root / "ix", torch_threads=1)
    try:
        embedder.send([decode_upload(data, 10 ** 6)])
        os.kill(embedder.pid, signal.SIGKILL)
        with pytest.raises(EmbedderStopped, match=r"^the embedding process stopped \(exit code -9\) during this "
                                                  r"batch; the next upload starts a new one$"):
            embedder.result()
        assert embedder([decode_upload(data, 10 ** 6)]).shape == (1, index.dim) and embedder.restarts == 1
    finally:
        embedder.close()


def test_serve_refuses_a_backbone_that_does_not_exist_in_one_line(served, capsys):
    root, _ = served
    capsys.readouterr()
    assert main(["serve", "--index", str(root / "ix"), "--backbone", str(root / "none.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: backbone {root / 'none.safetensors'} does not exist\n"
