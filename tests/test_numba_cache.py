"""Numba's cache of the kernels goes stale when any runtime file changes (runtime/kernels/numba_cache.py)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtime.kernels import numba_cache, uniform_int8_numba

RUNTIME = Path(uniform_int8_numba.__file__).resolve().parent.parent


def test_kernels_are_stamped_with_the_whole_runtime():
    locator = uniform_int8_numba.matvec_threads._cache._impl.locator
    assert locator.root == str(RUNTIME)
    file_stamp, tree_stamp = locator.get_source_stamp()
    assert tree_stamp == numba_cache.tree_hash(str(RUNTIME))
    assert Path(locator.get_cache_path()).is_dir()


def test_tree_hash_follows_every_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    first = numba_cache.tree_hash.__wrapped__(str(tmp_path))
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    assert numba_cache.tree_hash.__wrapped__(str(tmp_path)) != first
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    assert numba_cache.tree_hash.__wrapped__(str(tmp_path)) == first
    (tmp_path / "sub" / "b.py").rename(tmp_path / "sub" / "c.py")  # same bytes under another name
    assert numba_cache.tree_hash.__wrapped__(str(tmp_path)) != first


def _cached_caller(tmp_path, stamped: bool, value: int) -> int:
    """f() in a new process: pkg/a.py's cached f calls pkg/b.py's g, which returns `value` (b.py rewritten)."""
    package = tmp_path / "pkg"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text(textwrap.dedent("""
        from numba import njit
        from pkg.b import g

        @njit(cache=True)
        def f():
            return g()
    """))
    (package / "b.py").write_text(f"from numba import njit\n\n@njit\ndef g():\n    return {value}\n")
    install = f"numba_cache.install({str(package)!r}); " if stamped else ""
    script = (f"import sys; sys.path[:0] = [{str(tmp_path)!r}, {str(RUNTIME.parent)!r}]; "
              f"from runtime.kernels import numba_cache; {install}from pkg.a import f; print(f())")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.parametrize("stamped", [False, True])
def test_a_change_in_a_called_file_recompiles_the_caller(tmp_path, stamped):
    assert _cached_caller(tmp_path, stamped, 1) == 1
    # Numba's own stamp (stamped False) keeps a.py's cached f, with the old g compiled in; the tree's does not
    assert _cached_caller(tmp_path, stamped, 2) == (2 if stamped else 1)
