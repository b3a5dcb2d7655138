"""Lines per module and the longest functions of the library and the stage entry points.

Usage: python benchmarks/code_size.py [--top 10] [--root .]
Prints two markdown tables: the largest modules (`wc -l` lines) and the longest functions
(first to last line of the `def`, nested functions counted inside their parent too).
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def python_files(root: Path) -> list[Path]:
    return sorted((root / "src").rglob("*.py")) + sorted((root / "stages").glob("*.py"))


def function_lengths(path: Path, root: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [(node.end_lineno - node.lineno + 1, f"{path.relative_to(root)}:{node.lineno} {node.name}")
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    files = python_files(args.root)
    modules = sorted(((len(p.read_text().splitlines()), str(p.relative_to(args.root))) for p in files), reverse=True)
    functions = sorted((length for p in files for length in function_lengths(p, args.root)), reverse=True)
    print(f"{len(files)} files, {sum(n for n, _ in modules)} lines\n")
    print("| module | lines |\n|---|---:|")
    for lines, name in modules[:args.top]:
        print(f"| `{name}` | {lines} |")
    print("\n| function | lines |\n|---|---:|")
    for lines, name in functions[:args.top]:
        print(f"| `{name}` | {lines} |")


if __name__ == "__main__":
    main()
