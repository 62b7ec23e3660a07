"""Command-line flags generated from :class:`~sparseopt.train.config.TrainConfig`.

Every config field ``name`` is a flag ``--name`` (underscores as dashes);
booleans also get ``--no-name``. Values are type-checked by ``coerce``.
"""

from __future__ import annotations

import argparse
import logging
import typing
from dataclasses import fields
from importlib import resources
from pathlib import Path

from ..train.config import (
    FIELDS,
    RENAMED_KEYS,
    TrainConfig,
    _base_type,
    _field_type,
    field_choices,
    field_docs,
    make_config,
    unknown_key_message,
)

logger = logging.getLogger("sparseopt")


def default_config_path() -> Path:
    return Path(str(resources.files("sparseopt.train") / "configs" / "default.yaml"))


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: the embedded default job)")
    group = parser.add_argument_group("config keys (override the file; defaults shown are the built-in ones)")
    docs, choices, defaults = field_docs(), field_choices(), TrainConfig().to_dict()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        aliases = [f"--{old.replace('_', '-')}" for old, new in RENAMED_KEYS.items() if new == f.name]
        tp, optional = _base_type(_field_type(f.name))
        text = docs.get(f.name, "")
        if f.name in choices:
            text += f" {{{', '.join(map(str, choices[f.name]))}}}"
        default = defaults[f.name]
        text += f" (default: {' '.join(map(str, default)) if isinstance(default, list) else default})"
        text = text.replace("%", "%%").strip()
        if tp is bool:
            group.add_argument(flag, *aliases, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=text)
        elif typing.get_origin(tp) is list:
            group.add_argument(flag, *aliases, dest=f.name, nargs="+", default=argparse.SUPPRESS, metavar="N", help=text)
        else:
            metavar = {int: "INT", float: "FLOAT"}.get(tp, "NAME" if f.name in choices else "VALUE")
            group.add_argument(flag, *aliases, dest=f.name, default=argparse.SUPPRESS, help=text,
                               metavar=f"{metavar}|none" if optional else metavar)


def parse_train_args(parser: argparse.ArgumentParser, argv: list[str]) -> TrainConfig:
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ValueError(unknown_key_message(unknown[0], flag=True))
    for old, new in RENAMED_KEYS.items():
        old_flag = f"--{old.replace('_', '-')}"
        if any(a == old_flag or a.startswith(old_flag + "=") for a in argv):
            logger.warning("%s is renamed --%s (the old flag still works)", old_flag, new.replace("_", "-"))
    overrides = {k: v for k, v in vars(args).items() if k in FIELDS}
    return make_config(args.config or default_config_path(), overrides)
