"""Files shipped with stemnet, found wherever it is installed: configs, job templates and
the demo micrograph.

In a wheel they are package data (``stemnet/configs``, ``stemnet/jobs``,
``stemnet/micrograph``: setup.cfg maps the repository's ``configs/``, ``jobs/`` and
``demo/micrograph/`` there); in a source checkout they are those repository folders.
A shipped config is named by its file stem within a kind (``demo`` is
``configs/training/demo.yaml`` where a training config is expected) or by kind and
stem (``simulation/demo``).
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import click

from stemnet.errors import UserError

CHECKOUT = {"configs": "configs", "jobs": "jobs", "micrograph": "demo/micrograph"}
CONFIG_KINDS = ("simulation", "training", "model", "machines", "scaling")


def shipped_dir(what: str) -> Path:
    """The folder of shipped ``configs``, ``jobs`` or ``micrograph`` files."""
    if what not in CHECKOUT:
        raise UserError(f"shipped folder {what!r}: expected one of {sorted(CHECKOUT)}")
    packaged = resources.files("stemnet") / what
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parents[1] / CHECKOUT[what]
    if checkout.is_dir():
        return checkout
    raise UserError(f"{packaged}: shipped {what} missing; reinstall stemnet")


def shipped_configs() -> Dict[str, List[str]]:
    """``{kind: [name, ...]}`` of the shipped configs, sorted."""
    root = shipped_dir("configs")
    return {kind: sorted(p.stem for p in (root / kind).glob("*.yaml")) for kind in CONFIG_KINDS
            if (root / kind).is_dir()}


def shipped_config(name: str, kinds: Sequence[str] = CONFIG_KINDS) -> Optional[Path]:
    """The shipped file named ``name`` (``demo``, ``training/demo``, ``demo.yaml``) among
    ``kinds`` (searched in order), or None."""
    root = shipped_dir("configs")
    stem = name[:-5] if name.endswith(".yaml") else name
    if "/" in stem:
        kind, _, stem = stem.partition("/")
        kinds = [kind] if kind in CONFIG_KINDS else []
    for kind in kinds:
        path = root / kind / f"{stem}.yaml"
        if path.is_file():
            return path
    return None


def resolve_config(value, kinds: Sequence[str] = CONFIG_KINDS) -> Path:
    """A config file: ``value`` itself when it is a file, else the shipped config of that name.

    Raises
    ------
    UserError
        Neither a file nor a shipped name (one line naming the value).
    """
    path = Path(value)
    if path.is_file():
        return path
    found = shipped_config(str(value), kinds)
    if found is not None:
        return found
    names = [f"{kind}/{n}" for kind, ns in shipped_configs().items() if kind in kinds for n in ns]
    raise UserError(f"{value}: no such file or shipped config; expected a YAML file or one of "
                    f"{', '.join(names)}")


def copy_config(name: str, dest) -> Path:
    """Copy shipped config ``name`` to ``dest`` (a file, or a folder to copy into); refuse
    to overwrite. Returns the new file."""
    source = shipped_config(name)
    if source is None:
        raise UserError(f"config {name}: not a shipped config; see `stemnet config list`")
    dest = Path(dest)
    target = dest / source.name if dest.is_dir() else dest
    if target.exists():
        raise UserError(f"{target}: already exists; choose another destination")
    if not target.parent.is_dir():
        raise UserError(f"{target.parent}: no such folder")
    shutil.copyfile(source, target)
    return target


class ConfigFile(click.ParamType):
    """A click option value: a YAML file, or a shipped config name among ``kinds``."""

    name = "FILE|NAME"

    def __init__(self, *kinds: str):
        self.kinds = kinds or CONFIG_KINDS

    def convert(self, value, param, ctx):
        if isinstance(value, Path) and value.is_file():
            return value
        try:
            return resolve_config(value, self.kinds)
        except UserError as error:
            self.fail(str(error), param, ctx)
