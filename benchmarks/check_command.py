"""gpu_check.sh --dry-run's check of one command it would run on the GPU machine, done on the CPU without
running the work:

    python benchmarks/check_command.py PYTHON benchmarks/bench_x.py ARGS...   import the benchmark (every
        module-level import) and parse ARGS with its own parser, stopping there (a typo in an argument or a
        missing import fails here, not in a GPU window)
    python benchmarks/check_command.py PYTHON -m pytest ARGS...               collect (no run) what ARGS select,
        which imports every test module; selecting nothing is an error
    python benchmarks/check_command.py PYTHON -m pip ...                      printed, not run
    python benchmarks/check_command.py CMD...                                 anything else runs as it is

Exit status 0 when the command would start; otherwise 1 with one line saying why.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path


class _Parsed(Exception):
    """Raised by the patched parse_args once a benchmark's arguments parsed: the check stops there."""


def check_benchmark(script: Path, args: list[str]) -> str:
    if not script.is_file():
        raise SystemExit(f"check_command: {script}: no such benchmark")
    sys.path.insert(0, str(script.parent))  # benchmarks import their siblings (common.py) as top-level modules
    spec = importlib.util.spec_from_file_location(f"_checked_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: dataclasses look their module up there
    spec.loader.exec_module(module)  # the module-level imports
    if not hasattr(module, "main"):
        raise SystemExit(f"check_command: {script} has no main(argv)")
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        ns = parse(self, argv, namespace)
        raise _Parsed(ns)

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        module.main(args)
    except _Parsed as parsed:
        return f"{script.name}: imports and arguments ok ({vars(parsed.args[0])})"
    except SystemExit as e:  # argparse's error (it printed the usage and the reason to stderr)
        raise SystemExit(f"check_command: {script.name} {' '.join(args)}: arguments refused (exit {e.code})")
    finally:
        argparse.ArgumentParser.parse_args = parse
    raise SystemExit(f"check_command: {script.name}: main() returned without parsing arguments")


def check_pytest(python: str, args: list[str]) -> str:
    proc = subprocess.run([python, "-m", "pytest", "--collect-only", "-q", *args], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    counts = [int(line.rsplit(":", 1)[1]) for line in lines if line.startswith("tests/") and line.rsplit(":", 1)[1].strip().isdigit()]
    if proc.returncode != 0:
        raise SystemExit(f"check_command: pytest {' '.join(args)}: collection failed (exit {proc.returncode}): "
                         + " | ".join(lines[-5:] + proc.stderr.strip().splitlines()[-3:]))
    return f"pytest {' '.join(args)}: {sum(counts)} tests selected in {len(counts)} files"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    python, rest = argv[0], argv[1:]
    if rest[:2] == ["-m", "pytest"]:
        print(check_pytest(python, rest[2:]))
    elif rest[:2] == ["-m", "pip"]:
        print(f"not run in a dry run: {' '.join(argv)}")
    elif rest and rest[0].endswith(".py") and Path(rest[0]).name.startswith("bench_"):
        print(check_benchmark(Path(rest[0]), rest[1:]))
    else:
        return subprocess.run(argv).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
