"""The shape of the code: modules without import cycles, and a restructure that changes no committed number."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
# The project's packages: the library, and the Hydra plugin that runs its sweeps.
PACKAGES = (REPO / "kl_research", REPO / "hydra_plugins" / "kl_research_sweeper")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every project module `path` imports, at the top or inside a function (a deferred import is still an edge)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in modules}
    return out


def test_the_project_modules_import_each_other_without_a_cycle():
    files = {_module_name(p): p for pkg in PACKAGES for p in pkg.rglob("*.py")}
    modules = set(files)
    graph = {m: _imports(p, modules) - {m} for m, p in files.items()}
    # importing a submodule from outside its package runs the package's __init__ first (and so everything it imports)
    for m in modules:
        for n in list(graph[m]):
            package = n.rsplit(".", 1)[0]
            if package in modules and package != "kl_research" and not m.startswith(package):
                graph[m].add(package)
    assert "kl_research.analysis.control" in graph["kl_research.runlog"]  # the check sees deferred and from-imports
    plugin = "hydra_plugins.kl_research_sweeper."  # ... and the plugin's, into its package and into the library
    assert f"{plugin}grid" in graph[f"{plugin}sweeper"] and "kl_research.report" in graph[f"{plugin}callbacks"]
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = [*path[path.index(n) :], n]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


# the tables each committed analysis must have (pairwise tests need both arms in the grid)
TABLES = {
    "pid_ci": {"cells.csv", "band.csv", "scores.csv", "pid_ci_vs_pid.csv", "pid_vs_adaptive.csv"},
    "sweep": {"cells.csv", "band.csv", "scores.csv", "frontier.csv", "pid_ci_vs_pid.csv", "pid_vs_adaptive.csv"},
    "grpo": {
        "cells.csv",
        "band.csv",
        "scores.csv",
        "frontier.csv",
        "verdict.csv",
        "pid_vs_adaptive.csv",
        "pid_ci_vs_pid.csv",
    },
    "smollm2": {"cells.csv", "band.csv", "scores.csv", "frontier.csv", "verdict.csv", "pid_vs_adaptive.csv"},
}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_the_committed_results_reproduce_from_their_committed_runs(tmp_path, name):
    """results/<name>/ was written by make_results.py from the runs committed beside it (command.txt): the analysis
    run again on them today gives the committed tables, number for number."""
    results = REPO / "results" / name
    text = (results / "command.txt").read_text()
    lines = [x for x in text.splitlines() if x.startswith("python scripts/make_results")]
    assert len(lines) == 1, lines  # the analysis command (the sweeps that made the runs are on the lines before it)
    command = lines[0].split()
    args = [a if a != f"results/{name}" else str(tmp_path) for a in command[2:]]
    assert all(Path(REPO / a).is_dir() for a in args if a.startswith("results/")), args  # its runs are committed
    subprocess.run([sys.executable, "scripts/make_results.py", *args], cwd=REPO, check=True, capture_output=True)
    tables = sorted(p.name for p in results.glob("*.csv") if p.stat().st_size > 1)  # verdict.csv: empty without fixed
    assert TABLES[name] <= set(tables)
    for table in tables:
        committed, again = pd.read_csv(results / table), pd.read_csv(tmp_path / table)
        pd.testing.assert_frame_equal(again, committed, check_exact=False, rtol=1e-9, obj=table)


def test_the_grpo_kl_mode_frontiers_reproduce_and_never_mix_algorithms(tmp_path):
    """results/grpo/kl_modes (the default sequence+exact beside TRL's loss+k3, under GRPO) was written by
    scripts/kl_gradient.py from the committed runs: run again it gives the same tables. A PPO frontier passed beside
    a GRPO one is refused, naming both algorithms."""
    results = REPO / "results" / "grpo" / "kl_modes"
    lines = [
        x for x in (results / "command.txt").read_text().splitlines() if x.startswith("python scripts/kl_gradient")
    ]
    assert len(lines) == 1, lines
    args = lines[0].split()[2:]
    args[args.index("--out") + 1] = str(tmp_path)
    sweeps = [args[i + 1] for i, a in enumerate(args) if a == "--sweep"]
    assert len(sweeps) >= 2 and all((REPO / d).is_dir() for d in sweeps), sweeps
    subprocess.run([sys.executable, "scripts/kl_gradient.py", *args], cwd=REPO, check=True, capture_output=True)
    for table in ("frontier.csv", "at_targets.csv", "controllability.csv", "scores.csv"):
        committed, again = pd.read_csv(results / table), pd.read_csv(tmp_path / table)
        pd.testing.assert_frame_equal(again, committed, check_exact=False, rtol=1e-9, obj=table)
    assert set(pd.read_csv(results / "scores.csv")["mode"]) == {"sequence+exact", "loss+k3"}
    ppo_and_grpo = ["--sweep", "results/sweep/frontier_runs", "--sweep", "results/grpo/k3_frontier_runs"]
    mixed = subprocess.run(
        [sys.executable, "scripts/kl_gradient.py", "frontier", *ppo_and_grpo, "--out", str(tmp_path / "mixed")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert mixed.returncode != 0 and "mix algorithms (algo.name: grpo, ppo)" in mixed.stderr, mixed.stderr[-2000:]
