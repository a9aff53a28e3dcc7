"""The one interface every method implements, so that swapping a method is changing one name.

Each paper's module (:mod:`~mini_kd.methods.reskd`, :mod:`~mini_kd.methods.lrmil`,
:mod:`~mini_kd.methods.ahdmil`) provides

- ``Config``: a dataclass of the method's own fields with the paper's defaults;
- ``Schedule``: a dataclass of how long and on how much it trains (epochs, batches, tiles per
  stage): a budget, set per preset by :func:`mini_kd.presets.schedule`;
- ``fit(cohort, split, config, schedule) -> Trained``: trains on ``split["train"]`` slides and
  selects on ``split["val"]`` slides of ``cohort``, nothing else;
- a subclass of :class:`Trained`, which ``fit`` returns and :func:`load` gives back.

A trained method saves itself to one file and gives a predictor, a callable from a slide file to
a :class:`Prediction` (built on the one slide pipeline of :mod:`mini_kd.inference`)::

    from mini_kd.methods import lrmil, load

    trained = lrmil.fit(cohort, split, lrmil.Config(), lrmil.Schedule())
    trained.save("lrmil.pt")
    predict = load("lrmil.pt").predictor()
    predict("slide.svs")   # Prediction(slide_id='slide', label=1, probability=0.93, ...)

The checkpoint layout is the same for every method:
``{"method", "format_version", "config", "state"}`` -- the method's name, :data:`FORMAT_VERSION`,
the config as a dict, and whatever tensors and numbers the method's predictor needs.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar

from mini_kd.errors import MiniKDError
from mini_kd.train import foreign_checkpoint, read_checkpoint, write_checkpoint

METHODS = ("reskd", "lrmil", "ahdmil")
FORMAT_VERSION = 1


@dataclass
class Prediction:
    """What a predictor says about one slide, and what saying it cost."""

    slide_id: str
    label: int                        # predicted class: 1 when probability >= 0.5
    probability: float                # P(class 1), e.g. P(tumour)
    tiles_read: dict[float, int]      # magnification -> tiles read at it
    pixels_decoded: int               # pixels of the stored (JPEG) tiles decoded to read them
    seconds: dict[str, float]         # stage -> seconds (see mini_kd.inference)
    details: dict = field(default_factory=dict, repr=False)  # the method's own: grid, attention ...

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def row(self) -> dict:
        """One flat row for a CSV or JSON file (``details`` left out)."""
        return {"slide_id": self.slide_id, "label": self.label, "probability": self.probability,
                **{f"tiles_{mag:g}x": n for mag, n in self.tiles_read.items()},
                "pixels_decoded": self.pixels_decoded,
                **{f"seconds_{stage}": s for stage, s in self.seconds.items()},
                "seconds_total": self.total_seconds}


class Trained(ABC):
    """A trained method: its config and its networks. What ``fit`` returns and :func:`load`
    gives back; subclasses name the method (``method``) and say what their state is."""

    method: ClassVar[str]
    config: Any  # the method's Config

    @abstractmethod
    def state(self) -> dict:
        """Everything the predictor needs besides the config: state dicts, geometry, numbers."""

    @classmethod
    @abstractmethod
    def from_state(cls, config, state: dict) -> "Trained":
        """The inverse of :meth:`state`."""

    @abstractmethod
    def predictor(self, device=None) -> Callable[..., Prediction]:
        """``predict(slide_path, mpp=None) -> Prediction``."""

    def save(self, path) -> Path:
        """One checkpoint file (written atomically): ``{"method", "format_version", "config",
        "state"}``."""
        return write_checkpoint({"method": self.method, "format_version": FORMAT_VERSION,
                                 "config": asdict(self.config), "state": self.state()}, path)


def method_module(name: str):
    """The module of method ``name`` (one of :data:`METHODS`)."""
    if name not in METHODS:
        raise MiniKDError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return importlib.import_module(f"mini_kd.methods.{name}")


def load(path, method: str | None = None) -> Trained:
    """The trained method saved at ``path`` by :meth:`Trained.save`.

    ``method`` (optional) is the method the caller expects; a checkpoint of another one, of
    another format version, or not of this package at all is one clear error.
    """
    how = "train one with `mini-kd train METHOD COHORT --out FILE` or fix the path"
    kind = f"{method or 'mini_kd'}"
    saved = read_checkpoint(path, kind, how)
    with foreign_checkpoint(path, f"a checkpoint of {kind}", how):
        name, version = saved["method"], saved["format_version"]
        config, state = saved["config"], saved["state"]
    if method is not None and name != method:
        raise MiniKDError(f"{path} is a {name} checkpoint, not {method}; pass it to "
                          f"`mini-kd predict {name}`, or give a {method} checkpoint")
    if version != FORMAT_VERSION:
        raise MiniKDError(f"{path} has checkpoint format {version}; this mini_kd reads format "
                          f"{FORMAT_VERSION}: train the model again")
    module = method_module(name)
    with foreign_checkpoint(path, f"a checkpoint of {name}", how):
        known = {f.name for f in fields(module.Config)}
        config = module.Config(**{k: v for k, v in config.items() if k in known})
        return module.Trained.from_state(config, state)

