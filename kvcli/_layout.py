"""Where `kvcli.codecs` and `kvcli.kernels` come from in a source checkout.

The repository keeps `codecs/` and `kernels/` at its root, and without `__init__.py`: a folder with one is a
regular package under its bare name for every Python started in the root (`python -m pytest`, `python -m kvcli`,
Ray workers, notebooks), and it shadows any installed package of that name, as our `kernels/` once shadowed the
Hugging Face `kernels` that transformers imports. A folder without one is at most a namespace package, which
Python only builds when no installed package of that name exists.

A wheel installs both folders inside `kvcli/`, where the ordinary import finds them. In a checkout (an editable
install, or the root on `sys.path`) nothing maps them, since setuptools' editable finder only maps folders that
have an `__init__.py`: `install` adds a finder for exactly these two names, onto the root's folders.
"""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

FOLDERS = ("codecs", "kernels")


class CheckoutFolders:
    """A meta path finder: `kvcli.codecs` and `kvcli.kernels` as namespace packages over `ROOT/codecs`, `ROOT/kernels`."""

    def __init__(self, root: Path):
        self.root = str(root)

    def find_spec(self, fullname: str, path=None, target=None):
        parent, _, leaf = fullname.rpartition(".")
        if parent != __package__ or leaf not in FOLDERS:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [self.root])


def install() -> None:
    package = Path(__file__).resolve().parent
    if all((package / name).is_dir() for name in FOLDERS):
        return  # an installed wheel
    root = package.parent
    if not all((root / name).is_dir() for name in FOLDERS):
        return
    if not any(isinstance(finder, CheckoutFolders) for finder in sys.meta_path):
        sys.meta_path.append(CheckoutFolders(root))
