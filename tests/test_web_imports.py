"""The web package's import structure and its optional extra.

- No import cycle among ``rlhfkit.web`` and ``rlhfkit.feedback`` modules (module-level imports):
  routers import ``render`` and the dependencies from ``templating``/``deps``, never from ``app``,
  and no function-local import of a sibling module hides a cycle.
- The web app's packages are an extra: without them ``require_web_extra()`` says how to install
  them in one line, and the training pipeline and the CLI still import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import rlhfkit

PACKAGE = Path(rlhfkit.__file__).parent
CHECKED = ("rlhfkit.web", "rlhfkit.feedback")  # the import graph of these packages must have no cycle


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.Module, modules: set[str], top_level: bool) -> set[str]:
    """The modules of ``modules`` that ``tree`` imports: at module level (statements not inside a
    function or class, ``if``/``try`` blocks included), or inside functions."""
    out: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function != top_level:
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                else:  # `from rlhfkit.web import admin` imports the module rlhfkit.web.admin
                    names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
                out.update(n for n in names if n in modules)
            visit(child, inner)  # a class body runs at import time: its imports are module-level

    visit(tree, False)
    return out


def import_graph(top_level: bool = True) -> dict[str, set[str]]:
    """``{module: modules it imports}`` for the modules of ``CHECKED``."""
    files = {module_name(p): p for pkg in CHECKED for p in (PACKAGE.parent / pkg.replace(".", "/")).glob("*.py")}
    modules = set(files)
    return {m: imported(ast.parse(p.read_text()), modules, top_level) - {m} for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, …, a]``, or None (depth-first search, sorted for a stable answer)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y2"}, "y2": {"y"}}) == ["y", "y2", "y"]


def test_the_graph_sees_module_level_imports_only(tmp_path):
    tree = ast.parse(
        "from rlhfkit.web import deps\n"
        "import rlhfkit.web.security\n"
        "try:\n    from rlhfkit.web.models import ModelPool\nexcept ImportError:\n    pass\n"
        "def f():\n    from rlhfkit.web.app import create_app\n"
    )
    modules = {"rlhfkit.web", "rlhfkit.web.deps", "rlhfkit.web.security", "rlhfkit.web.models", "rlhfkit.web.app"}
    assert imported(tree, modules, top_level=True) == {
        "rlhfkit.web",
        "rlhfkit.web.deps",
        "rlhfkit.web.security",
        "rlhfkit.web.models",
    }
    assert imported(tree, modules, top_level=False) == {"rlhfkit.web.app"}


def test_web_and_feedback_modules_have_no_import_cycle():
    graph = import_graph()
    assert "rlhfkit.web.app" in graph and "rlhfkit.web.labeling" in graph["rlhfkit.web.app"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_local_import_of_a_sibling_module():
    """A function-local import of another module of the web package is how a cycle hides: import at the top."""
    graph = import_graph(top_level=False)
    local = {m: sorted(deps) for m, deps in graph.items() if deps and m.startswith("rlhfkit.web")}
    assert local == {}, f"function-local imports of rlhfkit.web modules: {local}"


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_without_the_web_extra_require_web_extra_says_how_to_install_it():
    code = (
        "import sys\n"
        "sys.modules['fastapi'] = None  # as if not installed: importing it raises ImportError\n"
        "from rlhfkit.errors import UserError\n"
        "from rlhfkit.web import require_web_extra\n"
        "try:\n    require_web_extra()\nexcept UserError as e:\n    print(e)\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "the web app needs its extra (fastapi is not installed): pip install 'rlhfkit[web]'\n"
    installed = run_python("from rlhfkit.web import require_web_extra; require_web_extra(); print('ok')")
    assert installed.stdout == "ok\n", installed.stderr


def test_the_pipeline_and_the_cli_import_without_the_web_extra():
    blocked = ("fastapi", "starlette", "uvicorn", "python_multipart", "multipart", "argon2")
    code = (
        "import sys\n"
        f"for name in {blocked!r}:\n    sys.modules[name] = None\n"
        "import rlhfkit.recipes.pipeline, rlhfkit.cli, rlhfkit.feedback.human\n"
        f"print(sorted(n for n in {blocked!r} if sys.modules.get(n) is not None))\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "[]\n"


def test_passwords_without_the_web_extra_say_how_to_install_it():
    code = (
        "import sys\n"
        "sys.modules['argon2'] = None\n"
        "from rlhfkit.errors import UserError\n"
        "from rlhfkit.feedback.accounts import hash_password\n"
        "try:\n    hash_password('password123')\nexcept UserError as e:\n    print(e)\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "passwords need the web extra: pip install 'rlhfkit[web]'\n"
