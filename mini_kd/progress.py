"""Progress bars for long loops: tqdm, silenced by ``MINI_KD_QUIET=1`` (the tests set it)."""

import os
import warnings

from tqdm import TqdmWarning

with warnings.catch_warnings():  # in Jupyter without ipywidgets tqdm warns, then uses text bars
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm


def quiet() -> bool:
    """True when progress output is switched off."""
    return os.environ.get("MINI_KD_QUIET", "0") not in ("", "0")


def progress(iterable=None, **kwargs):
    """``tqdm(iterable, **kwargs)``, disabled when :func:`quiet`."""
    disable = kwargs.pop("disable", False) or quiet()
    return tqdm(iterable, disable=disable, **kwargs)
