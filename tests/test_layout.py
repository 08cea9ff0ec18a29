"""The package's shape: layers that show the architecture, and no import cycles (module- or function-level, out
of ``__init__.py`` too), so each stage is one more module."""

import ast
from pathlib import Path

import slimexport

PKG = Path(slimexport.__file__).parent

# Bottom to top. A module imports only from its own layer or the layers below it (at module level or inside a
# function: both run). Base pieces know nothing of models or stages; the engine prunes any nn.Module; the model
# sources (built-ins, torchvision, timm, files) build what the engine prunes; the stages turn one artifact on disk
# into the next; the pipeline, the Python API and the CLI chain them.
LAYERS = {
    "base": ["errors", "fields", "config", "settings_file", "console", "fileio", "records", "channels", "stats",
             "runtime", "distributed", "assets"],
    "engine": ["oprules", "trace", "rawreads", "graph", "importance", "plan", "selfcheck", "fold", "graph_prune",
               "rewrite"],
    "models": ["models", "models.builtin", "models.external", "models.program"],
    "stages": ["data", "stream", "checkpoint", "regularizer", "precision", "loop", "train", "sparsity", "prune",
               "selection", "export", "latency", "deploy", "bench", "report", "detect", "detect.data", "detect.train",
               "detect.evaluate"],
    "top": ["rundir", "pipeline", "detect.pipeline", "sweep", "cli.sweeping", "api", "cli.options", "cli.app",
            "cli.training", "cli.deploying", "cli.pipeline", "cli.models", "cli", "", "__main__"],
}  # fmt: skip
LAYER_OF = {("slimexport." + m).rstrip("."): i for i, mods in enumerate(LAYERS.values()) for m in mods}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PKG.rglob("*.py")}  # fmt: skip


def _graph() -> dict[str, set[str]]:
    """Every import of a slimexport module by another, wherever it is written (also inside functions and in
    ``__init__.py``). ``from pkg import sub`` is an edge to ``pkg.sub``; importing ``a.b.c`` also runs the package
    ``a.b`` (but not the root package, whose ``__init__`` imports nothing)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
                targets = subs + ([node.module] if len(subs) < len(node.names) else [])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in list(targets):
                parts = t.split(".")
                targets += [".".join(parts[:i]) for i in range(2, len(parts))]  # the packages on the way
            targets = [t for t in targets if not m.startswith(t + ".")]  # (a module's own package is already running)
            graph[m] |= {t for t in targets if t in mods and t != m}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_sees_imports_inside_functions_and_init_files():
    g = _graph()
    assert "slimexport.api" in g["slimexport"]  # slimexport/__init__.py imports it inside __getattr__
    assert "slimexport.runtime" in g["slimexport.prune"]  # inside resolve_round_to
    assert "slimexport.models" in g["slimexport.checkpoint"]


def test_every_module_has_a_layer():
    assert set(_modules()) == set(LAYER_OF), set(_modules()) ^ set(LAYER_OF)


def test_modules_import_only_from_their_layer_or_below():
    names = list(LAYERS)
    up = sorted(
        f"{m} ({names[LAYER_OF[m]]}) imports {t} ({names[LAYER_OF[t]]})"
        for m, targets in _graph().items()
        for t in targets
        if LAYER_OF[t] > LAYER_OF[m]
    )
    assert not up, up


def test_the_layer_check_catches_an_upward_import():
    g = _graph()
    g["slimexport.graph_prune"].add("slimexport.models.external")
    assert any(LAYER_OF[t] > LAYER_OF[m] for m, ts in g.items() for t in ts)


def test_runtime_and_the_settings_are_leaves():
    """The settings (config) import nothing but errors, so every layer and a fast `--help` can read them; runtime
    reads only the settings."""
    g = _graph()
    assert g["slimexport.config"] <= {"slimexport.errors", "slimexport.fields"}
    assert g["slimexport.fields"] <= {"slimexport.errors"}
    assert g["slimexport.runtime"] <= {"slimexport.errors", "slimexport.config", "slimexport.fields"}


def test_the_reference_documents_report_json_as_the_types_say():
    from slimexport.records import schema_table

    reference = (PKG.parent / "docs" / "reference.md").read_text()
    assert schema_table() in reference


def test_every_readme_table_row_has_its_headers_cell_count():
    """A bare "|" inside a cell (as in |γ|) silently shifts the rest of the row into the wrong columns."""
    import re

    def cells(line: str) -> int:
        return len(re.split(r"(?<!\\)\|", line.strip().strip("|")))

    table: list[str] = []
    bad = []
    docs = [PKG.parent / "README.md", *sorted((PKG.parent / "docs").glob("*.md"))]
    for line in [line for doc in docs for line in [*doc.read_text().splitlines(), ""]]:
        if line.startswith("|"):
            table.append(line)
            continue
        bad += [row for row in table[2:] if table and cells(row) != cells(table[0])]
        table = []
    assert not bad, bad


def test_the_readme_is_a_front_door_that_links_every_doc():
    readme = (PKG.parent / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    for doc in sorted((PKG.parent / "docs").glob("*.md")):
        assert f"docs/{doc.name}" in readme, doc.name
    for target in __import__("re").findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", readme):
        assert (PKG.parent / target).exists(), target


def test_modules_and_functions_stay_readable():
    """No module over 600 lines, no function over 80: each is a place a reader must hold in their head."""
    long_modules, long_functions = [], []
    for p in sorted(PKG.rglob("*.py")):
        src = p.read_text()
        if len(src.splitlines()) > 600:
            long_modules.append(f"{p.relative_to(PKG)}: {len(src.splitlines())}")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_functions.append(f"{p.relative_to(PKG)}:{node.name} {node.end_lineno - node.lineno + 1}")
    assert not long_modules and not long_functions, (long_modules, long_functions)
