"""Files shipped inside installed PyPI packages, located without importing the packages."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from seamlm.errors import SeamError


class MissingPackageError(SeamError):
    """A data/model package is not installed, or lacks the expected file."""


def package_dir(package: str) -> Path:
    """Directory of an installed package, found with ``find_spec`` (the package is never imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"package '{package}' is not installed. Run the set-up step (`make setup`, or "
            f"`pip install --no-deps -r requirements-offline.txt`)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def package_file(package: str, relpath: str) -> Path:
    path = package_dir(package) / relpath
    if not path.exists():
        raise MissingPackageError(f"{path} is missing from package '{package}'; reinstall it (see requirements-offline.txt)")
    return path


def is_installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def cache_dir(kind: str) -> Path:
    """Where seamlm caches what it can rebuild (``judges``: trained judge heads; ``distill``: self-distilled
    answers): ``$SEAMLM_CACHE_DIR/<kind>``, else ``./cache/<kind>`` under the working directory."""
    return Path(os.environ.get("SEAMLM_CACHE_DIR") or "cache") / kind
