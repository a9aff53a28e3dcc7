"""Every notebook runs end to end with its `smoke` preset, and the book builds from the results.

papermill injects ``preset = "smoke"`` after the cell tagged ``parameters``. The executed copies
are then dropped into a copy of ``book/`` whose execution is switched off, so a broken ``_toc.yml``,
cross-reference or chapter fails here without running every notebook twice.
"""

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import papermill
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="session")
def executed_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("executed")


def _execute(notebook: Path, out_dir: Path) -> Path:
    out = out_dir / notebook.name
    papermill.execute_notebook(str(notebook), str(out), parameters={"preset": "smoke"},
                               kernel_name="python3", cwd=str(notebook.parent),
                               progress_bar=False, execution_timeout=900)
    return out


def test_make_data_builds_the_cohorts_and_caches_the_features_notebooks_03_to_05_share(session_data):
    """``data_scripts/prepare_book.py`` (``make data``) at the smoke preset, in the session's data
    folder: the notebooks below then start from its caches."""
    from mini_kd import presets
    from mini_kd.encoders import build_encoder
    from mini_kd.features import cohort_grids, feature_path

    done = subprocess.run([sys.executable, str(ROOT / "data_scripts" / "prepare_book.py"),
                           "--preset", "smoke"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "MINI_KD_DATA": str(session_data)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("\n") == 1 and "4 cohorts of the smoke preset ready" in done.stdout
    config = presets.config("lrmil", "smoke")
    encoder = build_encoder(config.encoder).eval()
    for cohort in (presets.phantom_cohort("smoke"), presets.real_cohort("smoke")):
        for mag, tile in ((config.hr_mag, config.hr_tile), (config.lr_mag, config.lr_tile)):
            grids = cohort_grids(cohort, mag, tile, config.min_tissue)
            missing = [s for s, grid in grids.items()
                       if not feature_path(cohort.root / "features", encoder, grid, s).is_file()]
            assert not missing, (cohort.root, mag, missing)


@pytest.mark.notebook
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_the_smoke_preset(notebook, executed_dir, session_data):
    out = _execute(notebook, executed_dir)
    assert out.exists()


def _build_book(book: Path) -> Path:
    """``jupyter-book build -W`` of ``book``; the folder of its HTML."""
    build = subprocess.run([str(Path(sys.executable).parent / "jupyter-book"), "build", "-W",
                            "--keep-going", str(book)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    return book / "_build" / "html"


@pytest.fixture(scope="session")
def smoke_book(executed_dir, session_data, tmp_path_factory) -> Path:
    """The book built from the smoke-executed notebooks, execution off; its HTML folder."""
    root = tmp_path_factory.mktemp("smoke_book")
    book = root / "book"
    shutil.copytree(ROOT / "book", book, symlinks=False, ignore=shutil.ignore_patterns("_build"))
    (root / "mini_kd").symlink_to(ROOT / "mini_kd")  # chapters literalinclude ../../mini_kd/...
    for notebook in NOTEBOOKS:
        executed = executed_dir / notebook.name
        if not executed.exists():  # its own test failed or was deselected: run it here
            executed = _execute(notebook, executed_dir)
        shutil.copy(executed, book / "notebooks" / notebook.name)
    config = yaml.safe_load((book / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"
    (book / "_config.yml").write_text(yaml.safe_dump(config))
    return _build_book(book)


@pytest.mark.notebook
def test_book_builds_from_the_executed_notebooks(smoke_book):
    assert NOTEBOOKS, "no notebooks found"
    assert (smoke_book / "index.html").exists()
    assert {page.stem for page in (smoke_book / "notebooks").glob("*.html")} == {
        notebook.stem for notebook in NOTEBOOKS}


class _Loads(HTMLParser):
    """What a page loads: ``(tag, url)`` for each ``<script src>``, each ``<link>`` that fetches
    (stylesheet, preload), and each URL written inside an inline ``<script>``."""

    def __init__(self):
        super().__init__()
        self.loads, self._in_inline_script = [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self._in_inline_script = "src" not in attrs
            if "src" in attrs:
                self.loads.append(("script", attrs["src"]))
        fetches = {"stylesheet", "preload", "modulepreload"} & set((attrs.get("rel") or "").split())
        if tag == "link" and fetches:
            self.loads.append(("link", attrs["href"]))

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_inline_script = False

    def handle_data(self, data):
        if self._in_inline_script:
            urls = re.findall(r"https?://[^\s'\"]+", data)
            self.loads += [("inline script", url) for url in urls]


def _loads(page: Path) -> list[tuple[str, str]]:
    parser = _Loads()
    parser.feed(page.read_text())
    return parser.loads


def test_a_page_s_loads_are_its_scripts_stylesheets_and_urls_in_inline_scripts():
    page = ("<link rel='stylesheet' href='https://cdn.example/a.css'><link rel='index' href='x.html'>"
            "<script src='_static/b.js'></script><script>load('http://cdn.example/c.js')</script>"
            "<p>see https://example.org</p>")
    parser = _Loads()
    parser.feed(page)
    assert parser.loads == [("link", "https://cdn.example/a.css"), ("script", "_static/b.js"),
                            ("inline script", "http://cdn.example/c.js")]


@pytest.mark.notebook
def test_no_page_of_the_book_loads_anything_from_the_network(smoke_book):
    pages = sorted(smoke_book.rglob("*.html"))
    remote = {(page.relative_to(smoke_book).as_posix(), tag, url) for page in pages
              for tag, url in _loads(page) if re.match(r"(https?:)?//", url)}
    assert len(pages) >= 1 + 2 * len(NOTEBOOKS)  # intro, a chapter and a notebook per paper
    assert remote == set()


@pytest.mark.notebook
def test_mathjax_is_served_from_the_book_s_own_static_folder(smoke_book):
    static = smoke_book / "_static"
    pages_with_maths = [page for page in sorted(smoke_book.rglob("*.html"))
                        if 'class="math' in page.read_text()]
    assert smoke_book / "intro.html" in pages_with_maths  # magnification = 10 / mpp
    for page in pages_with_maths:
        scripts = [(page.parent / url.split("?")[0]).resolve() for tag, url in _loads(page)
                   if tag == "script"]
        mathjax = [script for script in scripts if "mathjax" in script.name.lower()
                   or "mathjax" in script.parent.name.lower()]
        assert mathjax, f"{page.name} has maths but loads no MathJax"
        assert all(script.is_relative_to(static) and script.is_file() for script in mathjax)
    assert any((static / "mathjax" / "output" / "chtml" / "fonts").rglob("*.woff"))


def _notebook(code: str, markdown: str) -> str:
    cells = [nbformat.v4.new_markdown_cell(markdown), nbformat.v4.new_code_cell(code)]
    kernel = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nbformat.writes(nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": kernel}))


def test_a_rebuild_executes_a_notebook_again_only_when_its_code_or_the_package_changed(tmp_path):
    """The book's own _config.yml and _ext/ on a one-notebook book whose "package" is one file."""
    (tmp_path / "package").mkdir()
    (tmp_path / "package" / "value.py").write_text("VALUE = 1\n")
    book = tmp_path / "book"
    shutil.copytree(ROOT / "book" / "_ext", book / "_ext")
    config = yaml.safe_load((ROOT / "book" / "_config.yml").read_text())
    config["sphinx"]["config"]["execution_cache_sources"] = ["../package/*.py"]
    (book / "_config.yml").write_text(yaml.safe_dump(config))
    (book / "_toc.yml").write_text(yaml.safe_dump(
        {"format": "jb-book", "root": "intro", "chapters": [{"file": "run"}]}))
    code = ("from pathlib import Path\n"
            "with open('../runs.txt', 'a') as runs:\n"
            "    runs.write('run\\n')\n"
            "print(Path('../package/value.py').read_text())")
    runs = tmp_path / "runs.txt"

    def build(intro: str, markdown: str) -> tuple[int, str, str]:
        (book / "intro.md").write_text(f"# Intro\n\n{intro}\n")
        (book / "run.ipynb").write_text(_notebook(code, f"# Run\n\n{markdown}"))
        html = _build_book(book)
        return (len(runs.read_text().splitlines()), (html / "intro.html").read_text(),
                (html / "run.html").read_text())

    executions, _, page = build("First words.", "First notes.")
    assert executions == 1 and "VALUE = 1" in page
    executions, intro, page = build("Second words.", "Second notes.")  # prose only
    assert executions == 1 and "Second words." in intro and "Second notes." in page
    (tmp_path / "package" / "value.py").write_text("VALUE = 2\n")
    executions, _, page = build("Second words.", "Second notes.")
    assert executions == 2 and "VALUE = 2" in page and "VALUE = 1" not in page
