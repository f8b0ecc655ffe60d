"""benchmarks/bench_media.py --quick runs end to end and ends stdout with one JSON object (not a timing test)."""
import importlib.util
import json
from pathlib import Path


def test_bench_media_quick(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_media.py"
    spec = importlib.util.spec_from_file_location("bench_media", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--device", "cpu", "--clip-dir", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["bench"] == "media" and summary["clips"] == 6
    assert {"pyav x1"} <= set(summary["results"]) and all(r["clips_per_s"] > 0 for r in summary["results"].values())
