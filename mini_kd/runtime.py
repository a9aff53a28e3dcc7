"""Where and how the package runs: the device, the seeds, torch's threads, and atomic writes.

- **Device.** :func:`pick_device` is the one place the device is chosen: CUDA when torch sees a
  GPU, else the CPU. Nothing assumes a GPU.
- **Seeds.** :func:`seed_everything` seeds python, numpy and torch; the same seed on the CPU gives
  the same numbers.
- **Threads.** One policy, :func:`torch_threads`: the small networks of the course (an ABMIL on a
  bag of a few hundred features, a jitter on one 64-px image) run *faster* on one intra-op thread
  than on two on a shared CPU, where waking a second thread costs more than it saves (measured:
  LRMIL's teacher 86 s on two threads, 10 s on one). The experiments train those on one thread on
  the CPU; encoders of whole tile batches keep torch's default. On a GPU the setting is left alone.
- **Atomic writes.** :func:`write_atomically` writes ``<path>.partial`` and renames it: a reader
  sees a whole file or none, whatever interrupts the writer. Checkpoints (``.pt``), feature
  caches (``.h5``) and region caches (``.npz``) all go through it.
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mini_kd.errors import MiniKDError


def pick_device(device=None) -> torch.device:
    """The device to run on: ``device`` when given, else CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MiniKDError(f"device {str(device)!r} was asked for but torch sees no CUDA GPU; "
                          "pass device=None (or 'cpu') to run on the CPU")
    return device


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (every device) and make cuDNN repeatable.

    cuDNN's autotuner picks kernels by timing them, which changes results from run to run; turning
    it off is cheap. ``torch.use_deterministic_algorithms`` is left alone: it makes some CUDA
    scatter kernels raise, and on a CPU our ops are repeatable without it.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


@contextmanager
def torch_threads(n: int | None = 1, device=None):
    """torch's intra-op threads set to ``n`` inside the block, restored after.

    ``n=None`` leaves them alone, and so does a CUDA ``device`` (the work is on the GPU).
    """
    before = torch.get_num_threads()
    if n is not None and pick_device(device).type == "cpu":
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_atomically(path, write: Callable[[Path], None]) -> Path:
    """``write(temporary)`` then rename the temporary file to ``path`` (creating the folder).

    The temporary file is ``<path>.partial`` beside ``path`` (one file system, so the rename is
    atomic on POSIX); it is removed when ``write`` fails or is interrupted (also by Ctrl-C).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path
