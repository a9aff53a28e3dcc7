"""Every notebook runs end to end with its `smoke` preset, and the book builds from the results.

papermill injects ``preset = "smoke"`` after the cell tagged ``parameters``. The executed copies
are then dropped into a copy of ``book/`` whose execution is switched off, so a broken ``_toc.yml``,
cross-reference or chapter fails here without running every notebook twice.
"""

import shutil
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.notebook
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_the_smoke_preset(notebook, executed_dir, session_data):
    out = _execute(notebook, executed_dir)
    assert out.exists()


@pytest.mark.notebook
def test_book_builds_from_the_executed_notebooks(executed_dir, session_data, tmp_path):
    assert NOTEBOOKS, "no notebooks found"
    book = tmp_path / "book"
    shutil.copytree(ROOT / "book", book, symlinks=False, ignore=shutil.ignore_patterns("_build"))
    (tmp_path / "mini_kd").symlink_to(ROOT / "mini_kd")  # chapters literalinclude ../../mini_kd/...
    for notebook in NOTEBOOKS:
        executed = executed_dir / notebook.name
        if not executed.exists():  # its own test failed or was deselected: run it here
            executed = _execute(notebook, executed_dir)
        shutil.copy(executed, book / "notebooks" / notebook.name)
    config = yaml.safe_load((book / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"
    (book / "_config.yml").write_text(yaml.safe_dump(config))
    build = subprocess.run([str(Path(sys.executable).parent / "jupyter-book"), "build", "-W",
                            "--keep-going", str(book)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    assert (book / "_build" / "html" / "index.html").exists()
