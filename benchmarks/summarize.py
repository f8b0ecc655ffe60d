"""The short table gpu_check.sh prints last: the headline figure of each benchmark JSON in a results folder."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def headline(result: dict) -> list[str]:
    """One line per row of a benchmark's JSON: its name and the figures it reports."""
    lines = []
    for row in result.get("rows", []):
        figures = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        nested = {f"{k}.{kk}": vv for k, v in row.items() if isinstance(v, dict)
                  for kk, vv in v.items() if isinstance(vv, (int, float))}
        text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in {**figures, **nested}.items())
        lines.append(f"{result.get('bench', '?'):>18} | {text}")
    return lines


def main(folder: str) -> None:
    env = Path(folder) / "environment.json"
    if env.exists():
        e = json.loads(env.read_text())
        print(f"machine: {e.get('gpu') or 'CPU'}; torch {e.get('torch')}, triton {e.get('triton')}")
    for path in sorted(Path(folder).glob("bench_*.json")):
        result = json.loads(path.read_text())
        flag = " (quick CPU smoke run: not a measurement)" if result.get("quick") else ""
        print(f"-- {path.stem}{flag}")
        print("\n".join(headline(result)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu-results")
