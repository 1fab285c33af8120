"""Dependencies point one way (DESIGN.md): runtime/ imports nothing from the top level, and loading a saved
model through the public API imports nothing of the build (calibration, the build driver, the methods)."""
import ast
import json
import subprocess
import sys

import pytest

from conftest import ROOT, save_tiny_llama
from pipeline.quantize_model import build_quantized
from pipeline.tags import parse_tag

BUILD_MODULES = ("pipeline.calibration", "pipeline.quantize_model", "pipeline.smoothing", "pipeline.training",
                 "rtn", "gptq", "spqr", "quip", "quipsharp", "int8", "nf4", "layerwise", "tqdm")
FILE_MODULES = ("jinja2", "gguf", "sentencepiece", "runtime.text.chat_template", "runtime.checkpoints.gguf_io")


def top_level_packages() -> set:
    """The project's top-level packages other than runtime (pipeline)."""
    return {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"runtime"}


def top_level_names() -> set:
    """The project's top-level modules and packages other than runtime: model, the methods, the CLIs, pipeline."""
    return {p.stem for p in ROOT.glob("*.py")} | top_level_packages() | {"tests", "conftest"}


def imported_names(tree: ast.AST, packages: set) -> list:
    """(line, module) of every import in `tree`: statements at any depth, the string literals given to
    importlib.import_module / __import__, and strings naming a module of one of `packages` ("pipeline.api",
    as a registry would hold it; not every dotted string, as "model.norm.weight" is a tensor's name)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and (getattr(node.func, "attr", None) == "import_module"
                                             or getattr(node.func, "id", None) in ("import_module", "__import__")):
            found += [(node.lineno, a.value) for a in node.args[:1]
                      if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.count(".") \
                and all(part.isidentifier() for part in node.value.split(".")):
            found += [(node.lineno, node.value)] * (node.value.split(".")[0] in packages)
    return found


def test_runtime_imports_nothing_from_the_top_level():
    top, packages = top_level_names(), top_level_packages()
    assert {"model", "rtn", "gptq", "quipsharp", "pipeline", "run", "quantize"} <= top
    wrong = [f"{path.relative_to(ROOT)}:{line}: {name}"
             for path in sorted((ROOT / "runtime").rglob("*.py"))
             for line, name in imported_names(ast.parse(path.read_text(), str(path)), packages)
             if name.split(".")[0] in top]
    assert not wrong, "runtime/ imports the top level:\n" + "\n".join(wrong)


def test_the_check_sees_imports_inside_functions_and_by_name():
    source = "def f():\n    import gptq\n    from model import Model\nimportlib.import_module('rtn')\nX = 'pipeline.api'\n" \
             "W = 'model.norm.weight'\n"
    found = [name for _, name in imported_names(ast.parse(source), {"pipeline"})]
    assert sorted(found) == ["gptq", "model", "pipeline.api", "rtn"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("direction")
    save_tiny_llama(root / "hf")
    return build_quantized(root / "hf", parse_tag("rtn4"), root / "packed", progress=False)


def test_loading_a_saved_model_imports_no_build_module(packed):
    """Nor the libraries only some files need: Jinja2 (chat templates), gguf and sentencepiece (those files)."""
    assert (packed / "tokenizer.json").is_file() and not (packed / "tokenizer.model").exists()
    unwanted = BUILD_MODULES + FILE_MODULES
    script = ("import json, sys\n"
              "from pipeline.api import load\n"
              f"llm = load({str(packed)!r})\n"
              "llm.generate('Hello', max_new_tokens=2, temperature=0)\n"
              f"print(json.dumps(sorted(m for m in {unwanted!r} if m in sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []
