"""Shared test set-up: quiet progress bars, two threads, a fresh data folder per session."""

import os

os.environ.setdefault("MINI_KD_QUIET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def session_data(tmp_path_factory):
    """A data folder shared by the whole test session (phantom cohorts are cached here)."""
    path = tmp_path_factory.mktemp("mini_kd_data")
    os.environ["MINI_KD_DATA"] = str(path)
    return path
