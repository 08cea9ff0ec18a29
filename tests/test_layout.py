"""The package's shape: no import cycles (module- or function-level), so each stage is one more module."""

import ast
from pathlib import Path

import slimexport

PKG = Path(slimexport.__file__).parent


def _graph() -> dict[str, set[str]]:
    mods = {".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PKG.rglob("*.py")}  # fmt: skip
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {t for t in targets if t in mods and t != m and not (p.name == "__init__.py")}
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


def test_runtime_is_a_leaf():
    assert _graph()["slimexport.runtime"] <= {"slimexport.errors"}


def test_the_readme_documents_report_json_as_the_types_say():
    from slimexport.records import schema_table

    readme = (PKG.parent / "README.md").read_text()
    assert schema_table() in readme


def test_every_readme_table_row_has_its_headers_cell_count():
    """A bare "|" inside a cell (as in |γ|) silently shifts the rest of the row into the wrong columns."""
    import re

    def cells(line: str) -> int:
        return len(re.split(r"(?<!\\)\|", line.strip().strip("|")))

    table: list[str] = []
    bad = []
    for line in [*(PKG.parent / "README.md").read_text().splitlines(), ""]:
        if line.startswith("|"):
            table.append(line)
            continue
        bad += [row for row in table[2:] if table and cells(row) != cells(table[0])]
        table = []
    assert not bad, bad
