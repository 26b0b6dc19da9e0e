"""llama.cpp's published source as PyPI ships it: the llama-cpp-python source distribution.

Tests read reference material from it without copying it into this repository: the chat templates that
llama.cpp keeps of popular models (vendor/llama.cpp/models/templates/*.jinja, each the model's published
template) and llama.cpp itself. The tarball is fetched once with pip (PyPI only) into a cache folder;
CI fetches it before the tests (.ci/run)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from functools import lru_cache
from pathlib import Path

VERSION = "0.3.36"
NAME = f"llama_cpp_python-{VERSION}"
CACHE = Path(os.environ.get("TUNELAB_TEST_CACHE", Path.home() / ".cache" / "tunelab-tests"))


def sdist() -> Path:
    """The path of llama-cpp-python's source tarball, downloaded from PyPI on first use (about 75 MB)."""
    path = CACHE / f"{NAME}.tar.gz"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(CACHE)], check=True)
    return path


@lru_cache(maxsize=None)
def read_text(member: str) -> str:
    """One file of the tarball as text, by its path under llama.cpp's root (e.g. models/templates/X.jinja)."""
    with tarfile.open(sdist()) as tar:
        return tar.extractfile(f"{NAME}/vendor/llama.cpp/{member}").read().decode("utf-8")


@lru_cache(maxsize=None)
def read_folder(folder: str) -> dict[str, str]:
    """Every file directly under one folder of llama.cpp (e.g. models/templates) as text, by its path under
    llama.cpp's root, in one pass over the tarball (each read_text decompresses it up to its member)."""
    root = f"{NAME}/vendor/llama.cpp/"
    with tarfile.open(sdist()) as tar:
        return {m.name[len(root):]: tar.extractfile(m).read().decode("utf-8") for m in tar
                if m.isfile() and m.name.rpartition("/")[0] == root + folder.strip("/")}
