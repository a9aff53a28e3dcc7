"""Keep the book's jupyter-cache honest about the package the notebooks import.

With ``execute_notebooks: cache`` a notebook runs again only when its code cells change
(jupyter-cache hashes the cells, nothing else), so an edit to ``mini_kd/`` would leave every
result stale. This Sphinx extension computes a key over the files that the notebooks depend on
without showing it in their cells,

    k = sha256(path_1, bytes_1, ..., path_n, bytes_n, name_1=value_1, ..., name_m=value_m)

over the files matched by ``execution_cache_sources`` (globs relative to the book folder, e.g.
``../mini_kd/**/*.py``, which also covers the phantom's ``GENERATOR_VERSION``) and the
environment variables named by ``execution_cache_environment``. When ``k`` differs from the
key stored beside the cache, the cache is cleared and every page is read again, so each
notebook executes once under the new sources; the key is stored only after a build that
succeeded, so a failed build never marks stale results as current.
"""

import glob
import hashlib
import os
from pathlib import Path

from jupyter_cache import get_cache
from sphinx.errors import ExtensionError
from sphinx.util import logging

logger = logging.getLogger(__name__)


def source_files(srcdir: Path, patterns: list[str]) -> list[Path]:
    """The files matched by each glob in ``patterns`` (relative to ``srcdir``), sorted."""
    files = set()
    for pattern in patterns:
        matched = glob.glob(str(srcdir / pattern), recursive=True)
        if not matched:
            raise ExtensionError(f"execution_cache_sources: {pattern!r} matches no file under "
                                 f"{srcdir}; fix the pattern in _config.yml")
        files.update(Path(path) for path in matched if Path(path).is_file())
    return sorted(files)


def cache_key(srcdir: Path, patterns: list[str], environment: list[str]) -> str:
    """``k``: sha256 over each matched file's path and bytes, then each named variable's value."""
    digest = hashlib.sha256()
    for path in source_files(srcdir, patterns):
        digest.update(os.path.relpath(path, srcdir).encode() + b"\0" + path.read_bytes() + b"\0")
    for name in environment:
        digest.update(f"{name}={os.environ.get(name, '')}\0".encode())
    return digest.hexdigest()


def key_path(app) -> Path:
    """The stored key, beside the cache folder: ``_build/.jupyter_cache.key``."""
    cache = Path(app.env.mystnb_config.execution_cache_path)
    return cache.with_name(cache.name + ".key")


def clear_if_stale(app):
    """On ``builder-inited`` (after myst-nb has set the cache path): clear a stale cache."""
    app.env.execution_cache_key = cache_key(Path(app.srcdir), app.config.execution_cache_sources,
                                            app.config.execution_cache_environment)
    stored = key_path(app)
    app.env.execution_cache_stale = (not stored.exists()
                                     or stored.read_text() != app.env.execution_cache_key)
    cache_dir = Path(app.env.mystnb_config.execution_cache_path)
    if app.env.execution_cache_stale and cache_dir.exists():
        logger.info("execution cache: the package's sources changed, clearing %s", cache_dir)
        get_cache(str(cache_dir)).clear_cache()


def reread_if_stale(app, env, added, changed, removed):
    """On ``env-get-outdated``: every page, when the key changed (their outputs came from the
    old sources), so each notebook executes again."""
    return env.found_docs if env.execution_cache_stale else []


def store_key(app, exception):
    """On ``build-finished``: record the key of a build that succeeded."""
    if exception is None:
        key_path(app).write_text(app.env.execution_cache_key)


def setup(app):
    app.add_config_value("execution_cache_sources", [], "env", [list])
    app.add_config_value("execution_cache_environment", [], "env", [list])
    app.connect("builder-inited", clear_if_stale, priority=600)  # myst-nb's runs at 500
    app.connect("env-get-outdated", reread_if_stale)
    app.connect("build-finished", store_key)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
