"""The checkout never shadows an installed distribution.

Commands run from the repository's root (`python -m pytest`, `python -m omni_fast.cli`, `torchrun -m ...`) put
the working directory first on sys.path, so a top-level folder that is a regular package (has __init__.py)
wins over any installed distribution with the same import name: our `kernels/` did exactly that to Hugging
Face's `kernels`, which transformers imports. Here every top-level folder's name is given a stand-in
package installed later on sys.path (PYTHONPATH), and a sitecustomize hook records, in each process as it
exits, where that name resolves and what was imported under it: always the stand-in, in the pytest process,
the CLI process and torchrun's worker.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN = {"omni_fast"}  # the folders that ARE this distribution's packages

HOOK = '''
import atexit, importlib.util, json, os, sys

def _record():
    names = json.loads(os.environ["SHADOW_PROBE_NAMES"])
    out = {}
    for name in names:
        spec = importlib.util.find_spec(name)
        module = sys.modules.get(name)
        out[name] = {"resolves_to": spec.origin if spec else None,
                     "imported_from": getattr(module, "__file__", None) if module else None}
    path = os.path.join(os.environ["SHADOW_PROBE_OUT"], f"{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump({"argv": sys.argv, "names": out}, f)

atexit.register(_record)
'''


def top_level_folders() -> list[str]:
    """The checkout's top-level folders whose name Python could import (tracked by git where it can tell)."""
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        dirs = {line.split("/", 1)[0] for line in tracked.splitlines() if "/" in line}
    except (OSError, subprocess.CalledProcessError):
        dirs = {p.name for p in ROOT.iterdir() if p.is_dir()}
    return sorted(d for d in dirs if d.isidentifier() and d not in OWN)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    for name in top_level_folders():
        (site / name).mkdir()
        (site / name / "__init__.py").write_text("STAND_IN = True\n")
    (site / "sitecustomize.py").write_text(HOOK)
    return site


def _run(cmd: list[str], site: Path, out: Path, timeout: float) -> list[dict]:
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
               SHADOW_PROBE_NAMES=json.dumps(top_level_folders()), SHADOW_PROBE_OUT=str(out))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert records, f"{cmd}: the probe recorded nothing (was sitecustomize imported?)"
    return records


def _assert_nothing_shadowed(records: list[dict], site: Path) -> None:
    bad = []
    for rec in records:
        for name, where in rec["names"].items():
            for key in ("resolves_to", "imported_from"):
                path = where[key]
                if path is not None and not Path(path).resolve().is_relative_to(site.resolve()):
                    bad.append(f"{' '.join(rec['argv'])}: `{name}` {key.replace('_', ' ')} {path}")
    assert not bad, "a folder of the checkout shadows an installed package:\n" + "\n".join(bad)


def test_the_probe_sees_the_folders():
    assert "kernels" in top_level_folders() and "tests" in top_level_folders()
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py makes the folder shadow `kernels`"


def test_python_m_pytest_from_the_root(stand_ins, tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "test_probe.py").write_text(
        "import importlib, json, os\n"
        "def test_names():\n"
        "    for name in json.loads(os.environ['SHADOW_PROBE_NAMES']):\n"
        "        assert getattr(importlib.import_module(name), 'STAND_IN', False), name\n")
    (probe / "pytest.ini").write_text("[pytest]\n")
    records = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(probe / "pytest.ini"),
                    str(probe / "test_probe.py")], stand_ins, tmp_path / "out", 120)
    _assert_nothing_shadowed(records, stand_ins)


def test_python_m_cli_from_the_root(stand_ins, tmp_path):
    records = _run([sys.executable, "-m", "omni_fast.cli", "--version"], stand_ins, tmp_path / "out", 120)
    _assert_nothing_shadowed(records, stand_ins)


@pytest.mark.slow
def test_torchrun_m_from_the_root(stand_ins, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    records = _run(cmd + ["--nproc_per_node", "1", "--master_port", "0", "-m", "omni_fast.cli", "--version"],
                   stand_ins, tmp_path / "out", 300)
    assert any("omni_fast.cli" in " ".join(r["argv"]) or r["argv"][0].endswith("cli.py") for r in records), records
    _assert_nothing_shadowed(records, stand_ins)


def test_the_kernels_subpackage_is_the_checkouts_folder():
    import omni_fast.kernels.sampling as sampling

    assert Path(sampling.__file__).resolve() == (ROOT / "kernels" / "sampling.py").resolve()
