"""Numba's on-disk cache of this project's kernels, made stale by a change to any source file they may compile in.

Numba keeps a cached function valid while its own source file is unchanged
(the index stores a hash of that file). But a compiled function carries the
code of every Numba function it calls, inlined or linked in, from other files:
after an upgrade that changes runtime/kernels/uniform_int8_numba.py and not
decode_layers_numba.py, the cached decode step still runs the old matvec
against the new data layout. Measured here: a changed quantize kernel made the
next process fail with "In 'NRT_adapt_ndarray_to_python', 'descr' is NULL", and
a change that kept the types the same would have given wrong numbers without a
word.

`install(root)` puts one locator in front of Numba's own for the files under
`root` (the runtime package): it finds the place Numba would have chosen (the
user's NUMBA_CACHE_DIR, the `__pycache__` beside the file, or the user-wide
cache) and adds to the file's stamp a hash of every .py file under `root`, so
any change there makes every cached kernel stale and Numba recompiles it on
first use (and writes over the old entries, as for any stale file). Functions
outside `root` keep Numba's locators untouched. A NUMBA_CACHE_LOCATOR_CLASSES
the user sets replaces Numba's whole list, this locator with it.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from numba.core import caching


@functools.cache
def tree_hash(root: str) -> str:
    """sha256 over every .py file under root: each path relative to root, then its bytes."""
    digest = hashlib.sha256()
    base = Path(root)
    for path in sorted(base.rglob("*.py")):
        digest.update(path.relative_to(base).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _locator_class(root: str, numba_locators: list) -> type:
    """The locator class for functions under root (`install`), delegating to the first of numba_locators that
    takes the function."""

    class TreeStampedLocator(caching._CacheLocator):
        """Numba's locator for the function, with the stamp of its file and of the whole tree under root."""

        def __init__(self, inner):
            self.inner = inner
            self._py_file = inner._py_file  # read by Numba's warnings

        def ensure_cache_path(self):
            self.inner.ensure_cache_path()

        def get_cache_path(self):
            return self.inner.get_cache_path()

        def get_source_stamp(self):
            return self.inner.get_source_stamp(), tree_hash(root)

        def get_disambiguator(self):
            return self.inner.get_disambiguator()

        @classmethod
        def from_function(cls, py_func, py_file):
            if not Path(py_file).resolve().is_relative_to(root):
                return None
            for locator_class in numba_locators:
                inner = locator_class.from_function(py_func, py_file)
                if inner is not None:
                    return cls(inner)
            return None

    TreeStampedLocator.root = root
    return TreeStampedLocator


def install(root) -> None:
    """Cache the Numba functions defined under `root` with the tree's stamp (module docstring); once per root."""
    root = str(Path(root).resolve())
    locators = caching.CacheImpl._locator_classes
    if any(getattr(locator, "root", None) == root for locator in locators):
        return
    locators.insert(0, _locator_class(root, list(locators)))
