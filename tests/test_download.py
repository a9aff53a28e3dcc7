"""Downloads against a local HTTP server on 127.0.0.1: resume, retries, checksums, the three cohorts.

The server (``http.server`` in a thread, ephemeral port) serves a phantom slide with Range support,
can drop the connection once half-way through a file, can ignore Range, answers fixed status codes,
and fakes the two APIs the cohort helpers speak: an S3 ListObjectsV2 listing (two keys a page, with
continuation tokens) and the GDC ``/files`` endpoint.
"""

import csv
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from mini_kd import download as dl
from mini_kd.errors import MiniKDError

ROOT = Path(__file__).resolve().parents[1]


class FakeServer:
    """What the handler serves and a log of what it was asked."""

    def __init__(self):
        self.files = {}              # url path -> bytes
        self.status = {}             # url path -> HTTP status to answer instead
        self.drop_once = set()       # url paths whose first transfer stops half-way
        self.ignore_range = set()    # url paths served whole even when a Range is asked for
        self.bucket = []             # (key, size) of the fake S3 listing
        self.gdc_hits = []           # hits of the fake GDC /files endpoint
        self.requests = []           # (path, query dict, Range header or None)
        self.url = ""

    def add(self, path, data: bytes) -> str:
        self.files[path] = data
        return self.url + path


def make_handler(state: FakeServer):
    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 5

        def log_message(self, *args):
            pass

        def do_GET(self):
            parts = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(parts.query))
            state.requests.append((parts.path, query, self.headers.get("Range")))
            if parts.path in state.status:
                self.send_error(state.status[parts.path])
            elif parts.path == "/" and query.get("list-type") == "2":
                self.reply(200, s3_listing(state.bucket, query), "application/xml")
            elif parts.path == "/files":
                self.reply(200, gdc_answer(state.gdc_hits, query), "application/json")
            elif parts.path in state.files:
                self.send_file(parts.path)
            else:
                self.send_error(404)

        def reply(self, status, body: bytes, content_type="application/octet-stream", headers=()):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def send_file(self, path):
            data = state.files[path]
            start = self.range_start()
            if start is None or path in state.ignore_range:
                status, body, headers = 200, data, [("Accept-Ranges", "bytes")]
            elif start >= len(data):
                self.reply(416, b"", headers=[("Content-Range", f"bytes */{len(data)}")])
                return
            else:
                status, body = 206, data[start:]
                headers = [("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")]
            if path in state.drop_once:
                state.drop_once.discard(path)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True  # the rest never comes
                return
            self.reply(status, body, headers=headers)

        def range_start(self):
            header = self.headers.get("Range")
            return int(header.removeprefix("bytes=").split("-")[0]) if header else None

    return Handler


def s3_listing(bucket, query, page_size=2) -> bytes:
    """ListObjectsV2 XML, ``page_size`` keys a page; the token is the index of the next key."""
    keys = [(k, s) for k, s in bucket if k.startswith(query.get("prefix", ""))]
    start = int(query.get("continuation-token", 0))
    page, truncated = keys[start:start + page_size], start + page_size < len(keys)
    contents = "".join(f"<Contents><Key>{k}</Key><Size>{s}</Size></Contents>" for k, s in page)
    token = (f"<NextContinuationToken>{start + page_size}</NextContinuationToken>"
             if truncated else "")
    return (f'<?xml version="1.0" encoding="UTF-8"?>'
            f'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<Name>camelyon-dataset</Name><KeyCount>{len(page)}</KeyCount>"
            f"<IsTruncated>{str(truncated).lower()}</IsTruncated>{token}{contents}"
            f"</ListBucketResult>").encode()


def gdc_answer(hits, query) -> bytes:
    start, size = int(query.get("from", 0)), int(query.get("size", 10))
    page = hits[start:start + size]
    return json.dumps({"data": {"hits": page, "pagination": {
        "count": len(page), "total": len(hits), "from": start, "size": size}},
        "warnings": {}}).encode()


@pytest.fixture
def server():
    state = FakeServer()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(dl, "RETRY_WAIT_SECONDS", 0.01)


@pytest.fixture(scope="module")
def slide_bytes(tmp_path_factory) -> bytes:
    """A small phantom-like slide: a 3-level JPEG-tiled SVS-style pyramid at 0.5 µm/px."""
    from mini_kd.pyramid import write_pyramid

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1024, 0:768]
    image = np.stack([200 - xx % 50, 150 + yy % 40, 180 + 0 * xx], axis=-1)
    image = np.clip(image + rng.integers(0, 30, image.shape), 0, 255).astype(np.uint8)
    path = write_pyramid(tmp_path_factory.mktemp("served") / "phantom.svs", image, mpp=0.5,
                         magnification=20)
    return Path(path).read_bytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# download(): one file
# ---------------------------------------------------------------------------------------------

def test_download_verifies_renames_and_gives_an_openable_slide(server, slide_bytes, tmp_path):
    from mini_kd.slides import open_slide

    url = server.add("/slides/phantom.svs", slide_bytes)
    path = dl.download(url, tmp_path / "phantom.svs", sha256=sha256(slide_bytes),
                       size=len(slide_bytes))
    assert path.read_bytes() == slide_bytes
    assert not (tmp_path / "phantom.svs.part").exists()
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.5)
        assert slide.level_count == 3


def test_a_partial_file_is_resumed_with_a_range_request(server, slide_bytes, tmp_path):
    url = server.add("/slides/phantom.svs", slide_bytes)
    (tmp_path / "phantom.svs.part").write_bytes(slide_bytes[:1000])
    path = dl.download(url, tmp_path / "phantom.svs", sha256=sha256(slide_bytes))
    assert path.read_bytes() == slide_bytes
    assert server.requests == [("/slides/phantom.svs", {}, "bytes=1000-")]


def test_a_server_that_ignores_range_makes_the_download_start_over(server, slide_bytes, tmp_path):
    url = server.add("/slides/phantom.svs", slide_bytes)
    server.ignore_range.add("/slides/phantom.svs")
    (tmp_path / "phantom.svs.part").write_bytes(b"stale bytes from another file")
    path = dl.download(url, tmp_path / "phantom.svs", sha256=sha256(slide_bytes))
    assert path.read_bytes() == slide_bytes


def test_a_dropped_connection_is_retried_and_resumed(server, slide_bytes, tmp_path):
    url = server.add("/slides/phantom.svs", slide_bytes)
    server.drop_once.add("/slides/phantom.svs")
    path = dl.download(url, tmp_path / "phantom.svs", sha256=sha256(slide_bytes))
    assert path.read_bytes() == slide_bytes
    ranges = [range_header for _, _, range_header in server.requests]
    assert ranges == [None, f"bytes={len(slide_bytes) // 2}-"]


def test_a_complete_part_file_answered_416_is_verified_and_kept(server, slide_bytes, tmp_path):
    url = server.add("/slides/phantom.svs", slide_bytes)
    (tmp_path / "phantom.svs.part").write_bytes(slide_bytes)
    path = dl.download(url, tmp_path / "phantom.svs", sha256=sha256(slide_bytes))
    assert path.read_bytes() == slide_bytes
    assert server.requests == [("/slides/phantom.svs", {}, f"bytes={len(slide_bytes)}-")]


def test_a_wrong_checksum_deletes_the_part_file_and_raises(server, slide_bytes, tmp_path):
    url = server.add("/slides/phantom.svs", slide_bytes)
    with pytest.raises(MiniKDError, match="sha256 .* expected 0000"):
        dl.download(url, tmp_path / "phantom.svs", sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_md5_and_size_are_checked_too(server, tmp_path):
    data = b"x" * 5000
    url = server.add("/file.bin", data)
    with pytest.raises(MiniKDError, match="5000 bytes, expected 4999"):
        dl.download(url, tmp_path / "a.bin", size=4999)
    with pytest.raises(MiniKDError, match="md5"):
        dl.download(url, tmp_path / "b.bin", md5=hashlib.md5(b"other").hexdigest())
    path = dl.download(url, tmp_path / "c.bin", size=5000, md5=hashlib.md5(data).hexdigest())
    assert path.read_bytes() == data


def test_a_verified_file_is_not_fetched_again_but_a_corrupt_one_is(server, tmp_path):
    data = b"slide bytes" * 100
    url = server.add("/file.bin", data)
    dest = dl.download(url, tmp_path / "file.bin", sha256=sha256(data))
    dl.download(url, dest, sha256=sha256(data))
    assert len(server.requests) == 1
    dest.write_bytes(b"corrupted")
    assert dl.download(url, dest, sha256=sha256(data)).read_bytes() == data
    assert len(server.requests) == 2


def test_404_fails_at_once_with_a_one_line_message(server, tmp_path):
    with pytest.raises(MiniKDError, match="not found \\(HTTP 404\\): check the URL") as error:
        dl.download(server.url + "/missing.svs", tmp_path / "missing.svs")
    assert "\n" not in str(error.value)
    assert len(server.requests) == 1


def test_403_says_access_was_denied(server, tmp_path):
    server.status["/private.svs"] = 403
    with pytest.raises(MiniKDError, match="denied \\(HTTP 403\\)"):
        dl.download(server.url + "/private.svs", tmp_path / "private.svs")


def test_server_errors_are_retried_then_reported(server, tmp_path):
    server.status["/busy.svs"] = 503
    with pytest.raises(MiniKDError, match="failed after 3 attempts \\(HTTP 503"):
        dl.download(server.url + "/busy.svs", tmp_path / "busy.svs", retries=2)
    assert len(server.requests) == 3


def test_an_unreachable_server_is_reported_and_the_partial_file_kept(tmp_path):
    with socket.socket() as probe:  # a port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    part = tmp_path / "slide.svs.part"
    part.write_bytes(b"first half")
    with pytest.raises(MiniKDError, match=f"partial file kept at {part}, run again to resume"):
        dl.download(f"http://127.0.0.1:{port}/slide.svs", tmp_path / "slide.svs", retries=1)
    assert part.read_bytes() == b"first half"


# ---------------------------------------------------------------------------------------------
# labels.csv
# ---------------------------------------------------------------------------------------------

def test_stratified_split_is_seeded_and_keeps_class_proportions():
    labels = {f"s{i:02d}": i % 2 for i in range(20)}
    split = dl.stratified_split(labels, seed=3)
    assert split == dl.stratified_split(labels, seed=3)
    assert split != dl.stratified_split(labels, seed=4)
    for label in (0, 1):
        names = [split[s] for s in labels if labels[s] == label]
        assert (names.count("train"), names.count("val"), names.count("test")) == (6, 2, 2)


def read_labels(path) -> dict:
    with open(path, newline="") as file:
        return {row["slide_id"]: (int(row["label"]), row["split"]) for row in csv.DictReader(file)}


# ---------------------------------------------------------------------------------------------
# CAMELYON16 (fake S3 bucket)
# ---------------------------------------------------------------------------------------------

def camelyon_bucket(server) -> dict:
    """Five slides under CAMELYON16/images/ plus one object the helpers must ignore."""
    names = ["normal_001", "normal_002", "test_001", "tumor_001", "tumor_002"]
    slides = {name: f"{name} pixels".encode() * 50 for name in names}
    for name, data in slides.items():
        server.add(f"/CAMELYON16/images/{name}.tif", data)
        server.bucket.append((f"CAMELYON16/images/{name}.tif", len(data)))
    server.bucket.append(("CAMELYON16/images/README.txt", 10))
    return slides


def test_camelyon16_listing_follows_continuation_tokens(server):
    camelyon_bucket(server)
    slides = dl.camelyon16_slides(server.url)
    assert [(s["name"], s["label"]) for s in slides] == [
        ("normal_001", 0), ("normal_002", 0), ("test_001", None), ("tumor_001", 1),
        ("tumor_002", 1)]
    tokens = [query.get("continuation-token") for _, query, _ in server.requests]
    assert tokens == [None, "2", "4"]


def test_camelyon16_first_n_takes_both_classes_and_writes_labels(server, tmp_path):
    slides = camelyon_bucket(server)
    paths = dl.download_camelyon16(tmp_path, first=3, base_url=server.url, progress=False)
    assert [p.name for p in paths] == ["normal_001.tif", "tumor_001.tif", "normal_002.tif"]
    assert all(p.parent == tmp_path / "slides" for p in paths)  # the phantom cohort's layout
    assert all(p.read_bytes() == slides[p.stem] for p in paths)
    labels = read_labels(tmp_path / "labels.csv")
    assert {k: v[0] for k, v in labels.items()} == {"normal_001": 0, "normal_002": 0,
                                                     "tumor_001": 1}


def test_camelyon16_test_slides_take_labels_from_the_reference_csv(server, tmp_path):
    camelyon_bucket(server)
    server.add("/CAMELYON16/evaluation/reference.csv",
               b"image,class,type,center\ntest_001.tif,Tumor,Macro,0\ntest_002.tif,Normal,,1\n")
    dl.download_camelyon16(tmp_path, names=["tumor_001", "test_001"], base_url=server.url)
    assert read_labels(tmp_path / "labels.csv")["test_001"] == (1, "test")


def test_camelyon16_test_slides_without_reference_are_left_out_with_a_warning(server, tmp_path):
    camelyon_bucket(server)
    with pytest.warns(UserWarning, match="no label for test_001"):
        paths = dl.download_camelyon16(tmp_path, names=["test_001", "normal_001"],
                                       base_url=server.url)
    assert [p.name for p in paths] == ["test_001.tif", "normal_001.tif"]
    assert list(read_labels(tmp_path / "labels.csv")) == ["normal_001"]


def test_camelyon16_unknown_names_are_reported(server, tmp_path):
    camelyon_bucket(server)
    with pytest.raises(MiniKDError, match="not in CAMELYON16: tumour_001"):
        dl.download_camelyon16(tmp_path, names=["tumour_001"], base_url=server.url)


def test_a_listing_that_is_not_s3_xml_is_a_clear_error(server):
    server.add("/website/", b"<html><body>not a bucket")
    with pytest.raises(MiniKDError, match="did not answer with an S3 XML listing"):
        dl.list_bucket(server.url + "/website", "CAMELYON16/images/")


# ---------------------------------------------------------------------------------------------
# TCGA-NSCLC (fake GDC API)
# ---------------------------------------------------------------------------------------------

def gdc_cohort(server, patients_per_project=4) -> dict:
    """Two slides for the first patient of each project (DX1, DX2), one for the others."""
    files = {}
    for project in ("TCGA-LUAD", "TCGA-LUSC"):
        for patient in range(patients_per_project):
            case = f"TCGA-{project[-2:]}-{patient:04d}"
            for dx in (1, 2) if patient == 0 else (1,):
                file_id = f"{project[-4:].lower()}-{patient}-{dx}"
                name = f"{case}-01Z-00-DX{dx}.{file_id}.svs"
                data = f"{name} pixels".encode() * 40
                server.add(f"/data/{file_id}", data)
                server.gdc_hits.append({
                    "id": file_id, "file_id": file_id, "file_name": name,
                    "md5sum": hashlib.md5(data).hexdigest(), "file_size": len(data),
                    "cases": [{"submitter_id": case, "project": {"project_id": project}}]})
                files[name] = data
    return files


def test_gdc_query_asks_for_open_diagnostic_svs_slides_page_by_page(server):
    gdc_cohort(server)
    slides = dl.gdc_diagnostic_slides(api_url=server.url, page_size=4)
    assert len(slides) == 10
    queries = [query for path, query, _ in server.requests if path == "/files"]
    assert [q["from"] for q in queries] == ["0", "4", "8"]
    conditions = {c["content"]["field"]: c["content"]["value"]
                  for c in json.loads(queries[0]["filters"])["content"]}
    assert conditions == {"cases.project.project_id": ["TCGA-LUSC", "TCGA-LUAD"],
                          "data_format": ["SVS"], "experimental_strategy": ["Diagnostic Slide"],
                          "access": ["open"]}
    assert set(queries[0]["fields"].split(",")) >= {"file_id", "file_name", "md5sum", "file_size",
                                                    "cases.project.project_id"}


def test_tcga_download_labels_lusc_0_luad_1_one_slide_per_patient(server, tmp_path):
    files = gdc_cohort(server)
    paths = dl.download_tcga_nsclc(tmp_path, n_per_class=3, seed=1, api_url=server.url)
    assert all(p.read_bytes() == files[p.name] for p in paths)
    labels = read_labels(tmp_path / "labels.csv")
    assert sorted(label for label, _ in labels.values()) == [0, 0, 0, 1, 1, 1]
    assert all(label == (1 if "-AD-" in slide_id else 0) for slide_id, (label, _) in labels.items())
    patients = [slide_id[:12] for slide_id in labels]
    assert len(set(patients)) == len(patients)
    again = dl.select_tcga(dl.gdc_diagnostic_slides(api_url=server.url), 3, seed=1)
    assert sorted(s["file_name"] for s in again) == sorted(p.name for p in paths)


def test_tcga_corrupt_download_is_caught_by_md5(server, tmp_path):
    gdc_cohort(server, patients_per_project=1)
    for hit in server.gdc_hits:
        hit["md5sum"] = "0" * 32
    with pytest.raises(MiniKDError, match="md5"):
        dl.download_tcga_nsclc(tmp_path, n_per_class=1, api_url=server.url)


def test_tcga_asking_for_too_many_patients_is_a_clear_error(server, tmp_path):
    gdc_cohort(server, patients_per_project=2)
    with pytest.raises(MiniKDError, match="fewer than 5: ask for fewer"):
        dl.download_tcga_nsclc(tmp_path, n_per_class=5, api_url=server.url)


# ---------------------------------------------------------------------------------------------
# OpenSlide test data (fake index.json)
# ---------------------------------------------------------------------------------------------

def openslide_folder(server, slide_bytes):
    server.add("/openslide-testdata/Aperio/phantom.svs", slide_bytes)
    server.add("/openslide-testdata/index.json", json.dumps({"Aperio/phantom.svs": {
        "description": "a phantom", "license": "CC0-1.0", "sha256": sha256(slide_bytes),
        "size": len(slide_bytes)}}).encode())
    return server.url + "/openslide-testdata"


def test_openslide_testdata_is_downloaded_by_relative_path_and_verified(server, slide_bytes,
                                                                       tmp_path):
    base_url = openslide_folder(server, slide_bytes)
    [path] = dl.download_openslide_testdata(["Aperio/phantom.svs"], tmp_path, base_url=base_url)
    assert path == tmp_path / "Aperio" / "phantom.svs"
    assert path.read_bytes() == slide_bytes
    with pytest.raises(MiniKDError, match="paths look like Aperio/phantom.svs"):
        dl.download_openslide_testdata(["Aperio/CMU-9.svs"], tmp_path, base_url=base_url)


# ---------------------------------------------------------------------------------------------
# data_scripts/: one line out, exit status 2 on a user error
# ---------------------------------------------------------------------------------------------

def run_script(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "data_scripts" / name), *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MINI_KD_QUIET": "1"})


def test_scripts_print_one_line_and_exit_2_on_a_user_error(server, slide_bytes, tmp_path):
    base_url = openslide_folder(server, slide_bytes)
    done = run_script("download_openslide_testdata.py", "Aperio/phantom.svs",
                      "--out", str(tmp_path), "--base-url", base_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and "phantom.svs" in done.stdout
    failed = run_script("download_openslide_testdata.py", "Aperio/nope.svs",
                        "--out", str(tmp_path), "--base-url", base_url)
    assert failed.returncode == 2
    assert failed.stderr.count("\n") == 1 and "not in the OpenSlide test data" in failed.stderr


def test_cohort_scripts_write_labels(server, tmp_path):
    camelyon_bucket(server)
    gdc_cohort(server)
    camelyon = run_script("download_camelyon16.py", "--first", "2", "--out",
                          str(tmp_path / "c16"), "--base-url", server.url)
    tcga = run_script("download_tcga_nsclc.py", "--n-per-class", "2", "--out",
                      str(tmp_path / "nsclc"), "--api-url", server.url, "--seed", "0")
    assert camelyon.returncode == 0 and tcga.returncode == 0, camelyon.stderr + tcga.stderr
    assert len(read_labels(tmp_path / "c16" / "labels.csv")) == 2
    assert len(read_labels(tmp_path / "nsclc" / "labels.csv")) == 4


def test_build_phantom_script_reports_a_bad_cohort_size_in_one_line(tmp_path):
    failed = run_script("build_phantom.py", str(tmp_path / "phantom"), "--slides", "2")
    assert failed.returncode == 2
    assert failed.stderr.count("\n") == 1 and "n_slides=2" in failed.stderr
