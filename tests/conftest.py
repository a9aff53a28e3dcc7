"""Shared test set-up: quiet progress bars, two threads, folds in this process, a fresh data
folder per session."""

import os

os.environ.setdefault("MINI_KD_QUIET", "1")
# The tests patch and spy on functions of this process, which worker processes would not see:
# experiments run their folds here. test_determinism runs folds in two workers on its own.
os.environ.setdefault("MINI_KD_WORKERS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def session_data(tmp_path_factory):
    """A data folder shared by the whole test session (phantom cohorts are cached here)."""
    path = tmp_path_factory.mktemp("mini_kd_data")
    os.environ["MINI_KD_DATA"] = str(path)
    return path
