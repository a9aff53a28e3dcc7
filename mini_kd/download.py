"""Resumable, verified downloads, and the public cohorts the ``gpu`` preset runs on.

:func:`download` is the one way a file enters the data folder. It writes to ``dest.part``; when a
``.part`` is already there it asks the server for the rest with an HTTP ``Range`` request (and starts
again when the server ignores the range); a dropped connection is retried and resumed; the finished
file is checked against its size and/or checksum (SHA-256 or MD5) and only then renamed into place
with :func:`os.replace`, so ``dest`` is never half-written. A file that is already there and passes
the checks is not fetched again.

Three public sources sit on top, each with a base URL that can be pointed elsewhere (the tests point
them at a server on 127.0.0.1):

* **CAMELYON16** (CC0) on the open S3 bucket ``camelyon-dataset``, read over anonymous HTTPS: the
  S3 ListObjectsV2 REST API lists ``CAMELYON16/images/`` with sizes; labels come from the names
  (``normal_*`` = 0, ``tumor_*`` = 1) and, for ``test_*``, from ``CAMELYON16/evaluation/reference.csv``.
* **TCGA-NSCLC** diagnostic slides through the GDC API: LUSC = 0, LUAD = 1, the label map AHDMIL uses;
  one slide per patient, so that no patient is in two splits; MD5 and size from the GDC index.
* **OpenSlide test data**, by path relative to the test-data folder (``Aperio/CMU-1.svs``), checked
  against the SHA-256 and size in the folder's ``index.json``.

The cohort helpers use the phantom cohort's layout: slides in ``out/slides/``, ``out/labels.csv``
(``slide_id,label,split``); ``slide_id`` is the file stem, as :func:`mini_kd.slides.open_slide`
names slides.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np

from mini_kd.errors import MiniKDError
from mini_kd.progress import progress as progress_bar

CHUNK_BYTES = 1 << 20
RETRY_WAIT_SECONDS = 1.0  # doubled after every failed attempt

CAMELYON16_URL = "https://camelyon-dataset.s3.amazonaws.com"
CAMELYON16_PREFIX = "CAMELYON16/images/"
CAMELYON16_REFERENCE = "CAMELYON16/evaluation/reference.csv"
GDC_API_URL = "https://api.gdc.cancer.gov"
TCGA_NSCLC_LABELS = {"TCGA-LUSC": 0, "TCGA-LUAD": 1}  # AHDMIL's label map
OPENSLIDE_TESTDATA_URL = "https://openslide.cs.cmu.edu/download/openslide-testdata"


class _Dropped(Exception):
    """The transfer ended before the whole file arrived; the next attempt resumes it."""


# ---------------------------------------------------------------------------------------------
# One file: fetch with retries, resume, verify, rename.
# ---------------------------------------------------------------------------------------------

def download(url, dest, sha256=None, size=None, retries=3, progress=True, timeout=60,
             md5=None) -> Path:
    """Download ``url`` to ``dest`` and return ``dest`` once it has the expected size and checksums.

    ``retries`` further attempts follow a dropped connection, a timeout or a 5xx answer, each
    resuming the ``.part`` file; 4xx answers and unknown hosts fail at once. Every failure raises
    :class:`MiniKDError` saying what failed and what to do.
    """
    dest = Path(dest)
    if dest.exists() and _matches(dest, size, sha256, md5) is None:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _with_retries(lambda: _fetch(url, part, size, progress, timeout), url, retries,
                  hint=lambda: _resume_hint(part))
    problem = _matches(part, size, sha256, md5)
    if problem is not None:
        part.unlink()
        raise MiniKDError(f"download of {url} is corrupt ({problem}); the partial file was "
                          "deleted: run again to download it afresh, or check the expected "
                          "checksum")
    os.replace(part, dest)
    return dest


def _fetch(url, part: Path, size, show_progress, timeout) -> None:
    """One attempt: append the missing bytes to ``part`` (or rewrite it); raise if cut short."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    if size is not None and offset == size:
        return
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code != 416 or not offset:
            raise
        _range_not_satisfiable(error, part, offset)
        return
    with response:
        if response.status != 206:  # the server ignored the range: start over
            offset = 0
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length is not None else size
        _copy(response, part, offset, expected, show_progress)
    received = part.stat().st_size
    if expected is not None and received < expected:
        raise _Dropped(f"connection closed after {received} of {expected} bytes")


def _range_not_satisfiable(error, part: Path, offset: int) -> None:
    """HTTP 416: the ``.part`` is complete when the server's length equals it, else start over."""
    content_range = error.headers.get("Content-Range", "")
    error.close()
    if content_range.endswith(f"/{offset}"):
        return
    part.unlink()
    raise _Dropped("the partial file does not match the server's file; starting again")


def _copy(response, part: Path, offset: int, total, show_progress) -> None:
    """Stream the body into ``part`` (appending at ``offset``) under a bytes progress bar."""
    with open(part, "ab" if offset else "wb") as file, progress_bar(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=part.name.removesuffix(".part"), disable=not show_progress) as bar:
        while chunk := response.read(CHUNK_BYTES):
            file.write(chunk)
            bar.update(len(chunk))


def _matches(path: Path, size, sha256, md5):
    """``None`` when ``path`` has the expected size and checksums, else what is wrong."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"{actual_size} bytes, expected {size}"
    for name, expected in (("sha256", sha256), ("md5", md5)):
        if expected is not None:
            actual = _digest(path, name)
            if actual != expected.lower():
                return f"{name} {actual}, expected {expected}"
    return None


def _digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _resume_hint(part: Path) -> str:
    if part.exists() and part.stat().st_size:
        return f"partial file kept at {part}, run again to resume"
    return "run again to retry"


# ---------------------------------------------------------------------------------------------
# Errors and retries, shared by file downloads and API queries.
# ---------------------------------------------------------------------------------------------

def _with_retries(attempt, url, retries, hint=lambda: "run again to retry"):
    """Call ``attempt()`` until it succeeds; transient failures wait and retry, others raise."""
    for number in range(retries + 1):
        try:
            return attempt()
        except urllib.error.HTTPError as error:
            error.close()
            if error.code < 500 and error.code != 429:
                raise MiniKDError(_http_message(url, error.code)) from None
            last = f"HTTP {error.code} {error.reason}"
        except urllib.error.URLError as error:
            if isinstance(error.reason, socket.gaierror):
                host = urllib.parse.urlsplit(url).hostname
                raise MiniKDError(f"cannot reach {host} (host not found) for {url}: "
                                  "check the URL or your network connection") from None
            last = str(error.reason)
        except (_Dropped, http.client.HTTPException, ConnectionError, TimeoutError) as error:
            last = f"{type(error).__name__}: {error}"
        if number < retries:
            time.sleep(RETRY_WAIT_SECONDS * 2 ** number)
    raise MiniKDError(f"{url} failed after {retries + 1} attempts ({last}): "
                      f"check the URL or your network; {hint()}")


def _http_message(url, code) -> str:
    if code == 404:
        return f"{url} not found (HTTP 404): check the URL, name or path"
    if code in (401, 403):
        return (f"access to {url} denied (HTTP {code}): the file may be controlled-access or the "
                "link expired; check the URL")
    return f"{url} was refused (HTTP {code}): check the URL and its query"


def fetch_bytes(url, retries=3, timeout=60) -> bytes:
    """The body of a small GET (an index, a listing, an API answer), with the same retries."""
    def attempt():
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    return _with_retries(attempt, url, retries)


def _url(base_url, path="", query=None) -> str:
    """``base_url/path?query`` with the path quoted and the query encoded."""
    url = base_url.rstrip("/") + "/" + urllib.parse.quote(path.lstrip("/"))
    return url + ("?" + urllib.parse.urlencode(query) if query else "")


# ---------------------------------------------------------------------------------------------
# labels.csv: the phantom's format, with a seeded stratified split.
# ---------------------------------------------------------------------------------------------

def stratified_split(labels: dict, seed=0, fractions=(0.6, 0.2, 0.2)) -> dict:
    """``{slide_id: "train" | "val" | "test"}`` with each class split by ``fractions`` (seeded)."""
    rng = np.random.default_rng(seed)
    split = {}
    for label in sorted(set(labels.values())):
        ids = sorted(slide_id for slide_id, value in labels.items() if value == label)
        ids = [ids[i] for i in rng.permutation(len(ids))]
        n_val, n_test = (int(len(ids) * fraction + 0.5) for fraction in fractions[1:])
        for position, slide_id in enumerate(ids):
            split[slide_id] = ("val" if position < n_val
                               else "test" if position < n_val + n_test else "train")
    return split


def write_labels(path, labels: dict, split: dict) -> Path:
    """Write ``labels.csv`` (``slide_id,label,split``), one row per labelled slide, sorted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["slide_id", "label", "split"])
        for slide_id in sorted(labels):
            writer.writerow([slide_id, labels[slide_id], split[slide_id]])
    return path


# ---------------------------------------------------------------------------------------------
# CAMELYON16 on S3.
# ---------------------------------------------------------------------------------------------

def list_bucket(base_url, prefix, max_pages=10_000) -> list[tuple[str, int]]:
    """``(key, size)`` of every object under ``prefix`` (S3 ListObjectsV2, page by page)."""
    objects, token = [], None
    for _ in range(max_pages):
        query = {"list-type": "2", "prefix": prefix}
        if token:
            query["continuation-token"] = token
        root = _parse_xml(fetch_bytes(_url(base_url, query=query)), base_url)
        objects += [(_child(item, "Key"), int(_child(item, "Size")))
                    for item in root if _local(item.tag) == "Contents"]
        token = _child(root, "NextContinuationToken")
        if _child(root, "IsTruncated") != "true":
            return objects
        if not token:
            raise MiniKDError(f"the listing of {base_url} is truncated but gives no continuation "
                              "token: check --base-url points to an S3 bucket")
    raise MiniKDError(f"the listing of {base_url}/{prefix} has more than {max_pages} pages: "
                      "use a narrower prefix")


def _parse_xml(body: bytes, base_url):
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError as error:
        raise MiniKDError(f"{base_url} did not answer with an S3 XML listing ({error}): "
                          "check --base-url") from None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]  # drop the XML namespace


def _child(element, name):
    return next((child.text for child in element if _local(child.tag) == name), None)


def camelyon16_label(name: str):
    """0 for ``normal_*``, 1 for ``tumor_*``, ``None`` for ``test_*`` (see the reference CSV)."""
    return {"normal": 0, "tumor": 1}.get(name.split("_", 1)[0].lower())


def camelyon16_slides(base_url=CAMELYON16_URL) -> list[dict]:
    """Every CAMELYON16 slide in the bucket: ``name`` (stem), ``key``, ``size``, ``label``."""
    return [{"name": Path(key).stem, "key": key, "size": size,
             "label": camelyon16_label(Path(key).name)}
            for key, size in list_bucket(base_url, CAMELYON16_PREFIX)
            if key.lower().endswith(".tif")]


def camelyon16_test_labels(base_url=CAMELYON16_URL) -> dict:
    """``{"test_001": 1, ...}`` from the challenge's reference CSV (Tumor = 1, Normal/Negative = 0)."""
    text = fetch_bytes(_url(base_url, CAMELYON16_REFERENCE)).decode("utf-8-sig")
    classes = {"tumor": 1, "normal": 0, "negative": 0}
    return {Path(row[0]).stem.lower(): classes[row[1].strip().lower()]
            for row in csv.reader(text.splitlines())
            if len(row) > 1 and row[1].strip().lower() in classes}


def select_camelyon16(slides, names=None, first=None) -> list[dict]:
    """The named slides, or the first ``first`` training slides taken alternately from each class."""
    if names:
        by_name = {slide["name"]: slide for slide in slides}
        missing = sorted(set(Path(name).stem for name in names) - set(by_name))
        if missing:
            raise MiniKDError(f"not in CAMELYON16: {', '.join(missing)}; names look like "
                              "normal_001, tumor_001, test_001")
        return [by_name[Path(name).stem] for name in names]
    if first is None:
        raise MiniKDError("choose CAMELYON16 slides by name or give how many (first=N / --first N)")
    classes = [[s for s in slides if s["label"] == label] for label in (0, 1)]
    alternating = [slide for pair in zip(*classes) for slide in pair]
    longer = max(classes, key=len)
    return (alternating + longer[len(alternating) // 2:])[:first]


def download_camelyon16(out, names=None, first=None, base_url=CAMELYON16_URL, seed=0,
                        progress=True) -> list[Path]:
    """Download a CAMELYON16 subset to ``out/slides/`` (sizes checked) and write ``out/labels.csv``.

    Splits: ``test_*`` slides are the challenge's test set; the training slides are split by class
    into train/val (80/20) when test slides are present, else train/val/test (60/20/20). A test
    slide whose label the reference CSV cannot give is downloaded but left out of ``labels.csv``
    with a warning.
    """
    out = Path(out)
    chosen = select_camelyon16(camelyon16_slides(base_url), names, first)
    paths = [download(_url(base_url, slide["key"]), out / "slides" / Path(slide["key"]).name,
                      size=slide["size"], progress=progress) for slide in chosen]
    labels = {slide["name"]: slide["label"] for slide in chosen if slide["label"] is not None}
    tests = [slide["name"] for slide in chosen if slide["label"] is None]
    test_labels = _camelyon16_test_labels_or_none(base_url) if tests else {}
    labels.update({name: test_labels[name.lower()] for name in tests
                   if name.lower() in test_labels})
    unlabelled = [name for name in tests if name not in labels]
    if unlabelled:
        warnings.warn(f"no label for {', '.join(unlabelled)} ({CAMELYON16_REFERENCE} unavailable "
                      "or silent): downloaded but left out of labels.csv", stacklevel=2)
    has_test = any(name in labels for name in tests)
    split = stratified_split({k: v for k, v in labels.items() if k not in tests}, seed,
                             (0.8, 0.2, 0.0) if has_test else (0.6, 0.2, 0.2))
    split.update({name: "test" for name in tests})
    write_labels(out / "labels.csv", labels, split)
    return paths


def _camelyon16_test_labels_or_none(base_url) -> dict:
    try:
        return camelyon16_test_labels(base_url)
    except MiniKDError:
        return {}


# ---------------------------------------------------------------------------------------------
# TCGA-NSCLC through the GDC API.
# ---------------------------------------------------------------------------------------------

GDC_FIELDS = "file_id,file_name,md5sum,file_size,cases.project.project_id,cases.submitter_id"


def gdc_filters(projects) -> dict:
    """Open-access SVS diagnostic slides of ``projects``, in the GDC filter language."""
    conditions = {"cases.project.project_id": list(projects), "data_format": ["SVS"],
                  "experimental_strategy": ["Diagnostic Slide"], "access": ["open"]}
    return {"op": "and", "content": [{"op": "in", "content": {"field": field, "value": value}}
                                     for field, value in conditions.items()]}


def gdc_diagnostic_slides(projects=tuple(TCGA_NSCLC_LABELS), api_url=GDC_API_URL,
                          page_size=1000) -> list[dict]:
    """Every matching file, as ``file_id``, ``file_name``, ``md5sum``, ``file_size``, ``project``
    and ``case`` (the patient's TCGA barcode), fetched page by page."""
    slides, start = [], 0
    while True:
        query = {"filters": json.dumps(gdc_filters(projects)), "fields": GDC_FIELDS,
                 "format": "JSON", "size": page_size, "from": start}
        data = _gdc_json(fetch_bytes(_url(api_url, "files", query)), api_url)
        slides += [_gdc_slide(hit) for hit in data["hits"]]
        start += len(data["hits"])
        if not data["hits"] or start >= data["pagination"]["total"]:
            return slides


def _gdc_json(body: bytes, api_url) -> dict:
    try:
        return json.loads(body)["data"]
    except (ValueError, KeyError) as error:
        raise MiniKDError(f"{api_url}/files did not answer with GDC JSON ({error}): "
                          "check --api-url") from None


def _gdc_slide(hit) -> dict:
    case = hit["cases"][0]
    return {"file_id": hit["file_id"], "file_name": hit["file_name"], "md5sum": hit["md5sum"],
            "file_size": int(hit["file_size"]), "project": case["project"]["project_id"],
            "case": case["submitter_id"]}


def select_tcga(slides, n_per_class, seed=0) -> list[dict]:
    """``n_per_class`` patients per project drawn with ``seed``; each patient's first slide by name."""
    rng = np.random.default_rng(seed)
    chosen = []
    for project in sorted(TCGA_NSCLC_LABELS):
        first_slide = {}
        for slide in sorted(slides, key=lambda s: s["file_name"]):
            if slide["project"] == project:
                first_slide.setdefault(slide["case"], slide)
        cases = sorted(first_slide)
        if len(cases) < n_per_class:
            raise MiniKDError(f"{project} has {len(cases)} patients with an open diagnostic slide, "
                              f"fewer than {n_per_class}: ask for fewer per class")
        chosen += [first_slide[cases[i]] for i in sorted(rng.choice(len(cases), n_per_class,
                                                                    replace=False))]
    return chosen


def download_tcga_nsclc(out, n_per_class=10, seed=0, api_url=GDC_API_URL,
                        progress=True) -> list[Path]:
    """Download ``n_per_class`` LUSC (0) and LUAD (1) slides to ``out/slides/`` (MD5 + size checked)
    and write ``out/labels.csv``."""
    out = Path(out)
    slides = gdc_diagnostic_slides(tuple(TCGA_NSCLC_LABELS), api_url)
    chosen = select_tcga(slides, n_per_class, seed)
    paths = [download(_url(api_url, f"data/{slide['file_id']}"),
                      out / "slides" / slide["file_name"], size=slide["file_size"],
                      md5=slide["md5sum"], progress=progress) for slide in chosen]
    labels = {Path(slide["file_name"]).stem: TCGA_NSCLC_LABELS[slide["project"]]
              for slide in chosen}
    write_labels(out / "labels.csv", labels, stratified_split(labels, seed))
    return paths


# ---------------------------------------------------------------------------------------------
# OpenSlide test data.
# ---------------------------------------------------------------------------------------------

def openslide_testdata_index(base_url=OPENSLIDE_TESTDATA_URL) -> dict:
    """``{"Aperio/CMU-1.svs": {"sha256": ..., "size": ..., ...}, ...}`` from ``index.json``."""
    try:
        return json.loads(fetch_bytes(_url(base_url, "index.json")))
    except ValueError as error:
        raise MiniKDError(f"{base_url}/index.json is not JSON ({error}): "
                          "check --base-url") from None


def download_openslide_testdata(paths, out, base_url=OPENSLIDE_TESTDATA_URL,
                                progress=True) -> list[Path]:
    """Download test slides by relative path (``Aperio/CMU-1.svs``) to ``out/<path>``, verified."""
    index = openslide_testdata_index(base_url)
    unknown = [path for path in paths if path not in index]
    if unknown:
        examples = ", ".join(sorted(index)[:3])
        raise MiniKDError(f"not in the OpenSlide test data: {', '.join(unknown)}; paths look like "
                          f"{examples}")
    return [download(_url(base_url, path), Path(out) / path, sha256=index[path]["sha256"],
                     size=index[path].get("size"), progress=progress) for path in paths]

