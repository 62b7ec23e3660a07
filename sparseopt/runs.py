"""What a run folder holds, and the one reader of it.

Training writes a run folder; deployment, sweeps, comparisons and reports read it. The
file names, the marker, the checkpoint format and how to rebuild the run's model from its
config are defined here once, below both: :class:`RunFolder` reads, ``sparseopt.train``
writes with the same names.

    config.yaml      resolved configuration (every key)
    env.json         environment, and every invocation of the run
    metrics.jsonl    one JSON line per epoch, and one per topology update ("event": "update")
    checkpoint.pt    the last epoch's complete state (format CHECKPOINT_FORMAT)
    results.json     final metrics and status
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from .data import DATASETS, FOLDER_DATASETS
from .files import load_checkpoint
from .models import MODELS, build_model, config_options

logger = logging.getLogger("sparseopt")

CONFIG_FILE = "config.yaml"
ENV_FILE = "env.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
RESULTS_FILE = "results.json"
MARKER = ".sparseopt-run"
LOCK_NAME = ".lock"
CHECKPOINT_FORMAT = "sparseopt-checkpoint-v1"


def jsonl_lines(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every line of a JSON-lines file that only ever grows by appends.

    A last line cut short (the process was killed, or the disk filled, in the middle of an append) is dropped
    with a warning, so the run can still be resumed and reported; a bad line anywhere else is an error.
    """
    path = Path(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                logger.warning("%s: its last line was cut short (%s) and is ignored", path, e)
                break
            raise ValueError(f"{path}, line {number}: not a JSON record ({e})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: not a JSON object")
        out.append((line, record))
    return out


def read_metrics(run_dir: str | Path, event: str | None = None) -> list[dict[str, Any]]:
    """Records of a run folder's ``metrics.jsonl`` (empty when there is none yet).

    ``event=None``: the per-epoch records; ``event="update"``: the per-topology-update
    records (lines with ``"event": "update"``).
    """
    return RunFolder(run_dir).metrics(event)


class RunFolder:
    """One run folder, read: its config, results, environment record, metrics and checkpoint."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- where -------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def env_path(self) -> Path:
        return self.path / ENV_FILE

    def has_config(self) -> bool:
        return self.config_path.is_file()

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file()

    # -- what --------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """``config.yaml`` as written (``yaml.safe_load``); a folder without one is one line."""
        if not self.has_config():
            raise FileNotFoundError(f"{self.path} is not a run folder: no {CONFIG_FILE}")
        data = yaml.safe_load(self.config_path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{self.config_path} does not hold a mapping of config keys")
        return data

    def results(self) -> dict[str, Any] | None:
        """``results.json``, or None before the run has written one."""
        return json.loads(self.results_path.read_text()) if self.results_path.is_file() else None

    def env(self) -> dict[str, Any]:
        """``env.json`` (empty when missing or unreadable: it only describes the run)."""
        try:
            record = json.loads(self.env_path.read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def metrics(self, event: str | None = None) -> list[dict[str, Any]]:
        """See :func:`read_metrics`."""
        if not self.metrics_path.is_file():
            return []
        return [r for _, r in jsonl_lines(self.metrics_path) if r.get("event") == event]

    def checkpoint(self, map_location="cpu") -> dict[str, Any]:
        """``checkpoint.pt``, loaded without unpickling code and checked to be a sparseopt training checkpoint."""
        state = load_checkpoint(self.checkpoint_path, map_location=map_location)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.checkpoint_path} is not a sparseopt training checkpoint")
        return state


@dataclass(frozen=True)
class ModelSpec:
    """What :func:`sparseopt.models.build_model` needs to rebuild a run's model (recorded in sparse exports)."""

    name: str
    num_classes: int
    in_shape: tuple[int, ...]
    kwargs: dict

    def build(self) -> nn.Module:
        return build_model(self.name, self.num_classes, in_shape=self.in_shape, **self.kwargs)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], num_classes: int | None = None) -> ModelSpec:
        """The model of a run's config (a ``config.yaml`` mapping) with ``num_classes`` outputs (default: the dataset's).

        The constructor gets the config keys it declares (``config_options``: ``shortcut`` for the CIFAR
        ResNets, ``mlp_hidden`` / ``mlp_norm`` for the MLP) and ``model_kwargs``; a key a config of an
        earlier version lacks leaves the constructor's default.
        """
        info = DATASETS[config["dataset"]]
        num_classes = num_classes if num_classes is not None else info.num_classes
        in_shape = info.in_shape
        if config["dataset"] in FOLDER_DATASETS:
            size = config.get("image_size") or in_shape[1]
            in_shape = (in_shape[0], size, size)
        kwargs = {param: config[key] for param, key in config_options(MODELS[config["model"]]).items() if key in config}
        kwargs = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in kwargs.items()}
        return cls(config["model"], num_classes, tuple(in_shape), {**kwargs, **(config.get("model_kwargs") or {})})
