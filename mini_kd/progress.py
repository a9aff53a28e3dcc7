"""Progress bars for long loops: tqdm, silenced by ``MINI_KD_QUIET=1`` (the tests set it)."""

import os

from tqdm.auto import tqdm


def quiet() -> bool:
    """True when progress output is switched off."""
    return os.environ.get("MINI_KD_QUIET", "0") not in ("", "0")


def progress(iterable=None, **kwargs):
    """``tqdm(iterable, **kwargs)``, disabled when :func:`quiet`."""
    disable = kwargs.pop("disable", False) or quiet()
    return tqdm(iterable, disable=disable, **kwargs)
