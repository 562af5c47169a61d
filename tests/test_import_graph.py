"""No import cycles in fastfactor, and every module imports on its own.

Two checks:

* the static import graph: every ``import`` / ``from ... import`` in ``fastfactor/`` and
  ``kernels/`` (installed as ``fastfactor.kernels``), at module level *and* inside functions,
  resolved to the fastfactor module it names; the graph must have no cycle (a function-level import
  that closes a loop is still a loop: it only moves the failure to the first call). The one
  exception: a module-level ``__getattr__`` serving deprecated aliases of names that moved;
* each module imported first, in a fresh interpreter state (a forked child of a process that
  imported only torch), so no module relies on another having been imported before it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREES = ((os.path.join(ROOT, "fastfactor"), "fastfactor"), (os.path.join(ROOT, "kernels"), "fastfactor.kernels"))


def _modules() -> dict:
    """``{dotted name: file}`` of every module of the package (``__main__`` excluded)."""
    mods = {}
    for base, pkg in TREES:
        for d, dirs, files in os.walk(base):
            dirs[:] = [x for x in dirs if not x.startswith((".", "__pycache__"))]
            for f in files:
                if not f.endswith(".py") or f == "__main__.py":
                    continue
                rel = os.path.relpath(os.path.join(d, f), base)[:-3].replace(os.sep, ".")
                if rel == "__init__":
                    name = pkg
                elif rel.endswith(".__init__"):
                    name = f"{pkg}.{rel[: -len('.__init__')]}"
                else:
                    name = f"{pkg}.{rel}"
                mods[name] = os.path.join(d, f)
    return mods


def _targets(mod: str, path: str, node, mods: dict) -> list:
    """The fastfactor modules one import statement of ``mod`` names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            parts = mod.split(".")
            if not path.endswith("__init__.py"):
                parts = parts[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = []
    for n in names:
        if not (n == "fastfactor" or n.startswith("fastfactor.")):
            continue
        while n not in mods and "." in n:  # `from .x import function` -> module x
            n = n.rsplit(".", 1)[0]
        if n in mods and n != mod:
            out.append(n)
    return out


#: edges that close a loop, each with its reason and the way out; the test fails when one of them
#: disappears (remove it here) and when any other loop appears
KNOWN_BACK_EDGES: dict = {}


def import_graph(known_back_edges=True) -> dict:
    mods = _modules()
    graph = {}
    for mod, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        # a module-level ``__getattr__`` (PEP 562) serves deprecated aliases of moved names: it
        # reaches the new home only when an old name is used, so it is not part of the layering
        nodes = [n for top in tree.body if not (isinstance(top, ast.FunctionDef) and top.name == "__getattr__")
                 for n in ast.walk(top)]
        graph[mod] = sorted({t for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom))
                             for t in _targets(mod, path, n, mods)
                             if known_back_edges or (mod, t) not in KNOWN_BACK_EDGES})
    return graph


def find_cycle(graph: dict):
    """One cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in graph.get(v, ()):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_the_graph_is_read_correctly():
    """The walker sees the package (the test cannot pass by finding nothing) and its known edges."""
    g = import_graph()
    assert {"fastfactor", "fastfactor.compress.driver", "fastfactor._io", "fastfactor.kernels.lowrank"} <= set(g)
    assert "fastfactor._io" in g["fastfactor.compress.io"]  # `from .. import _io`
    assert "fastfactor.compress.resume" in g["fastfactor.compress.driver"]  # `from . import resume as _resume`
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a"]}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph(known_back_edges=False))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_known_back_edges_are_still_needed():
    g = import_graph()
    for (a, b), why in KNOWN_BACK_EDGES.items():
        assert b in g.get(a, ()), f"{a} no longer imports {b}: remove it from KNOWN_BACK_EDGES ({why})"


def test_bottom_layer_imports_nothing_of_fastfactor():
    """``_io`` (atomic writes, checksums) and the report module sit at the bottom of the driver."""
    g = import_graph()
    assert g["fastfactor._io"] == []
    assert not {"fastfactor.compress.driver", "fastfactor.compress.storage", "fastfactor.compress.resume",
                "fastfactor.compress.checkpoint"} & set(g["fastfactor.compress.report"])
    assert g["fastfactor.compress.faults"] == []
    # storage knows files, resume knows what a run needs: resume builds on storage, never the reverse
    assert "fastfactor.compress.resume" not in g["fastfactor.compress.storage"]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_module_imports_first_in_a_fresh_process():
    mods = sorted(_modules())
    script = textwrap.dedent(f"""
        import os, sys, traceback
        sys.path.insert(0, {ROOT!r})
        import numpy, torch, triton, triton.language  # third-party, shared by every child; fastfactor is imported fresh in each
        failed = []
        for name in {mods!r}:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                try:
                    __import__(name)
                    code = 0
                except BaseException:
                    os.write(w, traceback.format_exc().encode()[-2000:])
                    code = 1
                os._exit(code)
            os.close(w)
            msg = b""
            while True:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                msg += chunk
            os.close(r)
            _, status = os.waitpid(pid, 0)
            if status != 0:
                failed.append(name + ": " + msg.decode(errors="replace"))
        print("\\n".join(failed))
        sys.exit(1 if failed else 0)
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
