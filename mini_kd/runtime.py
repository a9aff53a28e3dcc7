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
- **Workers.** :func:`map_jobs` runs independent jobs -- the folds of an experiment -- in worker
  processes, one per CPU core, each on ``cores / workers`` torch threads: the small networks train
  on one thread, so a second core would otherwise sit idle. Every job seeds its own training, so
  the results do not depend on which worker ran it or in what order (``MINI_KD_WORKERS=1`` runs
  them one after another in this process, with the same results).
- **Atomic writes.** :func:`write_atomically` writes ``<path>.<pid>.partial`` and renames it: a
  reader sees a whole file or none, whatever interrupts the writer. Checkpoints (``.pt``), feature
  caches (``.h5``) and region caches (``.npz``) all go through it.
"""

from __future__ import annotations

import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mini_kd.errors import MiniKDError
from mini_kd.progress import progress


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


def workers(n_jobs: int, device=None) -> int:
    """How many processes run ``n_jobs`` independent jobs: ``$MINI_KD_WORKERS`` when set, else one
    per CPU core this process may use, at most ``n_jobs``; one on a CUDA ``device`` (the jobs
    would share the GPU)."""
    if os.environ.get("MINI_KD_WORKERS"):
        try:
            n = int(os.environ["MINI_KD_WORKERS"])
        except ValueError:
            raise MiniKDError(f"MINI_KD_WORKERS={os.environ['MINI_KD_WORKERS']!r} is not a whole "
                              "number; set it to the number of worker processes, 1 for none") from None
    elif pick_device(device).type == "cuda":
        n = 1
    else:
        n = cores()
    return max(1, min(n, n_jobs))


def cores() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def map_jobs(task: Callable, jobs: list, *shared, device=None, desc: str = "jobs") -> list:
    """``[task(job, *shared) for job in jobs]``, the jobs spread over :func:`workers` processes.

    ``task`` must be a module-level function (a worker imports it by name) and ``jobs`` and
    ``shared`` picklable; what ``task`` returns comes back pickled. Workers are started with
    ``spawn`` (no copy of this process's threads or open files) and each runs torch on
    ``cores // workers`` threads. A failed job raises its error here, after the others stop.
    A script that calls this must keep its top-level code under ``if __name__ == "__main__":``
    (each worker imports the script it was started from).
    """
    n = workers(len(jobs), device)
    if n == 1:
        return [task(job, *shared) for job in progress(jobs, desc=desc)]
    threads = max(1, cores() // n)
    with _thread_env(threads), ProcessPoolExecutor(
            n, mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads,
            initargs=(threads,)) as pool:
        futures = [pool.submit(task, job, *shared) for job in jobs]
        try:
            for future in progress(as_completed(futures), total=len(futures), desc=desc):
                future.result()  # the first failure stops the rest
        except BrokenProcessPool as error:
            raise MiniKDError(
                f"a worker process of {desc!r} failed: {error.__cause__ or error} (from a script, "
                "keep its top-level code under `if __name__ == '__main__':`; MINI_KD_WORKERS=1 "
                "runs every job in this process)") from error
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return [future.result() for future in futures]


@contextmanager
def _thread_env(threads: int):
    """OpenMP's, MKL's and OpenBLAS's thread counts set to ``threads`` in the environment the
    workers start with (read when they import numpy and torch), restored after."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    before = {name: os.environ.get(name) for name in names}
    os.environ.update({name: str(threads) for name in names})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def write_atomically(path, write: Callable[[Path], None]) -> Path:
    """``write(temporary)`` then rename the temporary file to ``path`` (creating the folder).

    The temporary file is ``<path>.<pid>.partial`` beside ``path``: one file system, so the rename
    is atomic on POSIX, and one file per process, so two workers writing the same cache never
    write into one file. It is removed when ``write`` fails or is interrupted (also by Ctrl-C).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path
