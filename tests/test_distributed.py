"""Data-parallel training under torchrun with gloo on the CPU: 2 ranks equal 1 process on the same global batch,
resume under 2 and under 1, two "nodes" on one machine, and a failing rank that ends the job (no hang).

Each test launches real processes (`python -m torch.distributed.run ... -m omni_fast.cli train`), rendezvous on
127.0.0.1 only. The learning rate is large and adam_epsilon is 1, so that AdamW's update is nearly linear in the
gradient: the float noise of a different summation order stays at the noise level instead of being
amplified to +-lr where a gradient is tiny, while a real error (a gradient not summed, or summed twice, over
ranks) moves the weights by about 1e-3.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from omni_fast.grpo.metrics import read_metrics
from omni_fast.toy import make_toy_task, toy_config

pytestmark = pytest.mark.slow  # about 60 s: real torchrun jobs

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_toy_task(tmp_path_factory.mktemp("toy"), clips_per_label=2)


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _write_config(task, ckpt, path: Path, out: Path, per_device: int, **kw) -> Path:
    kw = {"max_grad_norm": 0.0, **kw}
    cfg = toy_config(task, ckpt, out, "grpo", max_steps=3, save_steps=1, per_device_train_batch_size=per_device,
                     num_generations=4, max_completion_length=6, progress=False, learning_rate=0.1,
                     adam_epsilon=1.0, reward_funcs=("rewards_for_tests:text_length", "format"), **kw).to_dict()
    path.write_text(json.dumps(cfg))
    return path


def _torchrun(config: Path | None, *extra: str, nproc: int = 2, launcher: list[str] | None = None) -> subprocess.Popen:
    """torchrun ... omni-fast train --config CONFIG EXTRA (config None: omni-fast EXTRA)."""
    launcher = launcher or ["--standalone"]
    command = ["train", "--config", str(config)] if config is not None else []
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node", str(nproc), "-m",
           "omni_fast.cli", *command, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out


def _single(config: Path, *extra: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "omni_fast.cli", "train", "--config", str(config), *extra],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    return proc.returncode, proc.stdout + proc.stderr


def _weights(checkpoint: Path) -> dict:
    return {k: v for k, v in load_file(str(checkpoint / "model.safetensors")).items() if "_tower." not in k}


def _relative_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a) / max(float(a[k].abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(task, tiny_ckpt, tmp_path_factory):
    """The same 3 steps on 2 ranks (2 prompts each) and on 1 process (4 prompts): the same global batch."""
    d = tmp_path_factory.mktemp("dist")
    two = _write_config(task, tiny_ckpt, d / "two.json", d / "two", per_device=2)
    one = _write_config(task, tiny_ckpt, d / "one.json", d / "one", per_device=4)
    rc, out = _finish(_torchrun(two))
    assert rc == 0, out[-3000:]
    rc, out1 = _single(one)
    assert rc == 0, out1[-3000:]
    return d


def test_two_ranks_equal_one_process(runs, tiny_ckpt):
    for step in (1, 3):  # step 1: the first update (a function of the first gradients); step 3: the weights
        a, b = _weights(runs / "one" / f"checkpoint-{step}"), _weights(runs / "two" / f"checkpoint-{step}")
        assert _relative_diff(a, b) <= 1e-6, step
    start = {k: v.float() for k, v in _weights(tiny_ckpt).items()}
    assert _relative_diff(start, _weights(runs / "one" / "checkpoint-3")) > 1e-3  # the weights did move
    one, two = read_metrics(runs / "one"), read_metrics(runs / "two")
    assert [m["step"] for m in two] == [1, 2, 3]
    for m1, m2 in zip(one, two):  # metrics are reduced over ranks before they are logged
        for key in ("loss", "reward", "reward_std", "rewards/format_reward", "completion_length", "grad_norm"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key
    rng = __import__("torch").load(runs / "two" / "checkpoint-3" / "rng_state.pt", weights_only=False)
    assert rng["world_size"] == 2 and len(rng["ranks"]) == 2


def test_resume_under_two_and_under_one(runs, task, tiny_ckpt, tmp_path):
    import shutil

    for name, nproc in (("again2", 2), ("again1", 1)):
        out = tmp_path / name
        out.mkdir()
        shutil.copytree(runs / "two" / "checkpoint-1", out / "checkpoint-1")
        (out / "latest").write_text("checkpoint-1\n")
        config = _write_config(task, tiny_ckpt, tmp_path / f"{name}.json", out, per_device=4 // nproc)
        rc, log = _finish(_torchrun(config, "--resume_from_checkpoint", "latest", nproc=nproc))
        assert rc == 0, log[-3000:]
        if nproc == 2:  # the same world size resumes exactly
            assert _relative_diff(_weights(runs / "two" / "checkpoint-3"), _weights(out / "checkpoint-3")) <= 1e-6
            straight = {m["step"]: m["loss"] for m in read_metrics(runs / "two")}
            for m in read_metrics(out):
                assert m["loss"] == pytest.approx(straight[m["step"]], rel=1e-5, abs=1e-7)
        else:  # another world size continues, and says so
            assert (out / "checkpoint-3").is_dir()
            assert "saved by 2 process(es) with 1" in (out / "train.log").read_text()


def test_two_nodes_on_one_machine(task, tiny_ckpt, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = _write_config(task, tiny_ckpt, tmp_path / "nodes.json", tmp_path / "nodes", per_device=2)
    common = ["--nnodes", "2", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    procs = [_torchrun(config, "--max_steps", "1", nproc=1, launcher=common + ["--node_rank", str(r)])
             for r in (0, 1)]
    results = [_finish(p) for p in procs]
    for rc, out in results:
        assert rc == 0, out[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path / "nodes")] == [1]
    assert (tmp_path / "nodes" / "checkpoint-1").is_dir()


def test_a_failing_rank_ends_the_job_with_its_message(task, tiny_ckpt, tmp_path):
    config = _write_config(task, tiny_ckpt, tmp_path / "fail.json", tmp_path / "fail", per_device=2)
    raw = json.loads(config.read_text())
    raw["reward_funcs"] = ["rewards_for_tests:fail_on_rank_1"]
    config.write_text(json.dumps(raw))
    t0 = time.monotonic()
    rc, out = _finish(_torchrun(config))
    assert rc != 0
    assert "rank 1's reward failed on purpose" in out
    assert time.monotonic() - t0 < TIMEOUT
    assert not list((tmp_path / "fail").glob("checkpoint-*"))


def test_eval_under_torchrun_equals_one_process(task, tiny_ckpt, tmp_path):
    entries = json.loads(task.grpo_annotations.read_text())[:5]
    entries.insert(2, {"video": "clips/missing.mp4", "conversations": entries[0]["conversations"]})
    ann = task.root / "eval5.json"
    ann.write_text(json.dumps(entries))
    args = ["eval", "--model_path", str(tiny_ckpt), "--annotations", str(ann), "--max_new_tokens", "6",
            "--device", "cpu", "--batch_size", "2"]
    rc, out = _finish(_torchrun(None, *args, "--out", str(tmp_path / "two.json")))
    assert rc == 0, out[-3000:]
    single = subprocess.run([sys.executable, "-m", "omni_fast.cli", *args, "--out", str(tmp_path / "one.json")],
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert single.returncode == 0, single.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert [r["index"] for r in two["results"]] == [0, 1, 3, 4, 5]  # record order, the missing clip skipped
    assert two["results"] == one["results"] and two["scores"] == one["scores"]


# --- FSDP2 (parallelism: fsdp) -------------------------------------------------------------------------------
def _sft_config(task, ckpt, path: Path, out: Path, per_device: int, **kw) -> Path:
    cfg = toy_config(task, ckpt, out, "sft", max_steps=3, save_steps=3, per_device_train_batch_size=per_device,
                     progress=False, learning_rate=0.1, adam_epsilon=1.0, max_grad_norm=1.0, **kw).to_dict()
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def fsdp_runs(task, tiny_ckpt, tmp_path_factory):
    """FSDP2 on 2 ranks against 1 process on the same global batch, GRPO (gradient clipping active: the norm is
    2.7-8 > 1) and SFT. The toy's 6 GRPO prompts make step 2 uneven: 2 prompts on rank 0, none on rank 1, which
    must still join every sharded forward and backward."""
    d = tmp_path_factory.mktemp("fsdp")
    jobs = {"grpo2": _write_config(task, tiny_ckpt, d / "grpo2.json", d / "grpo2", per_device=2, max_grad_norm=1.0,
                                   parallelism="fsdp"),
            "grpo1": _write_config(task, tiny_ckpt, d / "grpo1.json", d / "grpo1", per_device=4, max_grad_norm=1.0),
            "sft2": _sft_config(task, tiny_ckpt, d / "sft2.json", d / "sft2", per_device=4, parallelism="fsdp"),
            "sft1": _sft_config(task, tiny_ckpt, d / "sft1.json", d / "sft1", per_device=8)}
    for name, config in jobs.items():
        rc, out = _finish(_torchrun(config)) if name.endswith("2") else _single(config)
        assert rc == 0, f"{name}: {out[-3000:]}"
    return d


def test_fsdp_two_ranks_equal_one_process(fsdp_runs, tiny_ckpt):
    for step in (1, 2, 3):
        one, two = _weights(fsdp_runs / "grpo1" / f"checkpoint-{step}"), _weights(fsdp_runs / "grpo2" / f"checkpoint-{step}")
        assert _relative_diff(one, two) <= 1e-6, step
    start = {k: v.float() for k, v in _weights(tiny_ckpt).items()}
    assert _relative_diff(start, _weights(fsdp_runs / "grpo1" / "checkpoint-3")) > 1e-3
    for m1, m2 in zip(read_metrics(fsdp_runs / "grpo1"), read_metrics(fsdp_runs / "grpo2"), strict=True):
        assert m1["grad_norm"] > 1.0  # the clip is active, on shards under FSDP
        for key in ("loss", "reward", "kl", "grad_norm", "completion_length"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key


def test_fsdp_sft_equals_one_process(fsdp_runs):
    """18 SFT records, 8 a step: step 3 has 2, all on rank 0."""
    assert _relative_diff(_weights(fsdp_runs / "sft1" / "checkpoint-3"), _weights(fsdp_runs / "sft2" / "checkpoint-3")) <= 1e-6
    for m1, m2 in zip(read_metrics(fsdp_runs / "sft1"), read_metrics(fsdp_runs / "sft2"), strict=True):
        assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5) and m2["num_tokens"] == m1["num_tokens"]


def test_fsdp_checkpoint_resumes_under_fsdp_and_under_one_process(fsdp_runs, task, tiny_ckpt, tmp_path):
    """The checkpoint holds full tensors: FSDP on 2 ranks resumes exactly; one plain process continues."""
    import shutil

    for name, nproc, per_device, parallelism in (("fsdp2", 2, 2, "fsdp"), ("ddp1", 1, 4, "ddp")):
        out = tmp_path / name
        out.mkdir()
        shutil.copytree(fsdp_runs / "grpo2" / "checkpoint-1", out / "checkpoint-1")
        (out / "latest").write_text("checkpoint-1\n")
        config = _write_config(task, tiny_ckpt, tmp_path / f"{name}.json", out, per_device=per_device,
                               max_grad_norm=1.0, parallelism=parallelism)
        rc, log = _finish(_torchrun(config, "--resume_from_checkpoint", "latest", nproc=nproc))
        assert rc == 0, log[-3000:]
        straight = fsdp_runs / "grpo2" if nproc == 2 else fsdp_runs / "grpo1"
        # exact under the same world size; under one process the same global batch, RNG states aside (unused
        # by GRPO's seeded rollouts), so it also lands on the straight single-process run
        assert _relative_diff(_weights(straight / "checkpoint-3"), _weights(out / "checkpoint-3")) <= 1e-6


# --- LoRA (use_peft) under DDP and FSDP2 ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_runs(task, tiny_ckpt, tmp_path_factory):
    """LoRA (adapters on the decoder and the projectors, the reference = the adapters off) on 2 ranks under DDP
    and under FSDP2, and on 1 process, on the same global batch (step 2 uneven under FSDP, as above)."""
    d = tmp_path_factory.mktemp("lora")
    kw = dict(use_peft=True, lora_r=4, lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj", "mm_projector"), beta=0.1)
    jobs = {"ddp2": _write_config(task, tiny_ckpt, d / "ddp2.json", d / "ddp2", per_device=2, **kw),
            "fsdp2": _write_config(task, tiny_ckpt, d / "fsdp2.json", d / "fsdp2", per_device=2, parallelism="fsdp",
                                   **kw),
            "one": _write_config(task, tiny_ckpt, d / "one.json", d / "one", per_device=4, **kw)}
    for name, config in jobs.items():
        rc, out = _finish(_torchrun(config)) if name.endswith("2") else _single(config)
        assert rc == 0, f"{name}: {out[-3000:]}"
    return d


def _adapter(checkpoint: Path) -> dict:
    return load_file(str(checkpoint / "adapter_model.safetensors"))


@pytest.mark.parametrize("run", ["ddp2", "fsdp2"])
def test_lora_two_ranks_equal_one_process(lora_runs, run):
    for step in (1, 2, 3):
        assert _relative_diff(_adapter(lora_runs / "one" / f"checkpoint-{step}"),
                              _adapter(lora_runs / run / f"checkpoint-{step}")) <= 1e-6, step
    b = {k: v for k, v in _adapter(lora_runs / "one" / "checkpoint-3").items() if ".lora_B." in k}
    assert min(float(v.abs().max()) for v in b.values()) > 1e-3  # every adapter moved from B = 0
    for m1, m2 in zip(read_metrics(lora_runs / "one"), read_metrics(lora_runs / run), strict=True):
        for key in ("loss", "reward", "kl", "grad_norm", "completion_length"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key
    assert read_metrics(lora_runs / run)[-1]["kl"] > 0  # the reference (adapters off) is not the policy


# --- dynamic sampling -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dynamic_runs(task, tiny_ckpt, tmp_path_factory):
    """Dynamic sampling on 2 ranks and on 1 process: only the "happy" clips' groups have varied rewards, so steps
    draw more batches of prompts, and the ranks must agree on the step's groups (and on which surplus group
    goes) before the policy pass."""
    d = tmp_path_factory.mktemp("dynamic")
    kw = dict(dynamic_sampling=True, max_num_gen_batches=3)
    for name, per_device in (("two", 2), ("one", 4)):
        config = _write_config(task, tiny_ckpt, d / f"{name}.json", d / name, per_device=per_device, **kw)
        raw = json.loads(config.read_text())
        raw["reward_funcs"] = ["rewards_for_tests:varied_for_happy"]
        config.write_text(json.dumps(raw))
        rc, out = _finish(_torchrun(config)) if name == "two" else _single(config)
        assert rc == 0, f"{name}: {out[-3000:]}"
    return d


def test_dynamic_sampling_two_ranks_equal_one_process(dynamic_runs):
    for step in (1, 2, 3):
        assert _relative_diff(_weights(dynamic_runs / "one" / f"checkpoint-{step}"),
                              _weights(dynamic_runs / "two" / f"checkpoint-{step}")) <= 1e-6, step
    one, two = read_metrics(dynamic_runs / "one"), read_metrics(dynamic_runs / "two")
    assert sum(m["groups_dropped"] for m in one) > 0 and max(m["num_gen_batches"] for m in one) > 1
    for m1, m2 in zip(one, two, strict=True):
        for key in ("loss", "reward", "grad_norm", "num_gen_batches", "prompts_consumed", "groups_dropped", "groups"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key


# --- the options together under FSDP2 ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def together_runs(task, tiny_ckpt, tmp_path_factory):
    """Every option of issue 23 at once (LoRA on the decoder, dynamic sampling, overlong filtering and the soft
    punishment) on 2 ranks under FSDP2 and on 1 process, on the same global batch."""
    d = tmp_path_factory.mktemp("together")
    kw = dict(use_peft=True, lora_r=4, beta=0.1, dynamic_sampling=True, max_num_gen_batches=3,
              mask_truncated_completions=True, overlong_buffer_len=3, overlong_penalty_factor=0.5)
    for name, per_device, parallelism in (("two", 2, "fsdp"), ("one", 4, "ddp")):
        config = _write_config(task, tiny_ckpt, d / f"{name}.json", d / name, per_device=per_device,
                               parallelism=parallelism, **kw)
        raw = json.loads(config.read_text())
        raw["reward_funcs"] = ["rewards_for_tests:varied_for_happy"]
        config.write_text(json.dumps(raw))
        rc, out = _finish(_torchrun(config)) if name == "two" else _single(config)
        assert rc == 0, f"{name}: {out[-3000:]}"
    return d


def test_the_options_together_under_fsdp_equal_one_process(together_runs):
    for step in (1, 2, 3):
        assert _relative_diff(_adapter(together_runs / "one" / f"checkpoint-{step}"),
                              _adapter(together_runs / "two" / f"checkpoint-{step}")) <= 1e-6, step
    one, two = read_metrics(together_runs / "one"), read_metrics(together_runs / "two")
    assert sum(m["truncated_ratio"] for m in one) > 0 and all(m["rewards/overlong_reward"] < 0 for m in one)
    assert max(m["num_gen_batches"] for m in one) > 1
    for m1, m2 in zip(one, two, strict=True):
        for key in ("loss", "reward", "kl", "grad_norm", "rewards/overlong_reward", "truncated_ratio",
                    "num_gen_batches", "prompts_consumed", "groups_dropped", "groups"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key
