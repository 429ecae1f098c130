"""`python -m bench [AREA...]`: run each bench/bench_<area>.py module's `run()` and print
one table (area, metric, value, note). A module that fails shows its error in the table and
the others still run; the exit code says whether any failed."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import traceback

from rich.console import Console
from rich.table import Table

import bench

Row = tuple[str, str, str]


def discover() -> list[str]:
    """Area names of the bench modules present: bench_csi.py -> 'csi'."""
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))


def run_area(area: str) -> tuple[list[Row], bool]:
    """(rows, ok) for one module; an import or run failure becomes an error row."""
    try:
        module = importlib.import_module(f"bench.bench_{area}")
        rows = module.run()
        bad = [r for r in rows if not (isinstance(r, tuple) and len(r) == 3)]
        if bad:
            raise TypeError(f"run() must return (metric, value, note) tuples, got {bad[0]!r}")
        return [tuple(str(x) for x in r) for r in rows], True
    except Exception as exc:  # one broken bench must not hide the others' numbers
        traceback.print_exc(file=sys.stderr)
        return [("error", f"{type(exc).__name__}: {exc}", "this bench failed; traceback above")], False


def main(argv: list[str]) -> int:
    console = Console() if sys.stdout.isatty() else Console(width=150)  # no wrapping in logs
    available = discover()
    wanted = argv or available
    unknown = [a for a in wanted if a not in available]
    if unknown:
        console.print(f"[red]no bench module for {', '.join(unknown)}[/red]; available: {', '.join(available)}")
        return 2
    table = Table(title="pvlun benchmarks", show_lines=False)
    for column in ("area", "metric", "value", "note"):
        table.add_column(column, overflow="fold")
    failed = []
    for area in wanted:
        console.print(f"[bold]bench {area}[/bold] ...")
        start = time.monotonic()
        rows, ok = run_area(area)
        if not ok:
            failed.append(area)
        for i, (metric, value, note) in enumerate(rows):
            style = "red" if not ok else None
            table.add_row(area if i == 0 else "", metric, value, note, style=style)
        table.add_row("", f"[dim]({area} ran in {time.monotonic() - start:.1f} s)[/dim]", "", "", end_section=True)
    console.print(table)
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}[/red]")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
