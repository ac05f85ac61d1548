"""benchmarks/gpu_train.py runs (tiny, on the CPU) and writes what the lead reads from the GPU run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.models

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_train_benchmark_cpu_smoke(tmp_path):
    from benchmarks.gpu_train import main

    result = main(["--cpu-smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_train.json").read_text())
    assert saved["goals"] == json.loads(json.dumps(result["goals"]))
    assert "| run | batch |" in (tmp_path / "gpu_train.md").read_text()
    rows = {r["name"]: r for r in saved["rows"]}
    errors = {n: r["error"] for n, r in rows.items() if "error" in r}
    assert not errors, errors
    measured = [r for r in saved["rows"] if "samples_per_s" in r]
    loops = {(r.get("loop"), r.get("model", "")[:5]) for r in measured}
    assert {("fit", "dense"), ("bare", "dense"), ("fit (host rows)", "dense"), ("fit", "denoi"), ("fit", "model")} <= loops
    assert all(r["samples_per_s"] > 0 and math.isfinite(r["mfu"]) for r in measured if "mfu" in r)
    assert saved["peak_flops"] > 1e8
    # the compiled rows (CUDA) compare fit and the bare loop at the default row's own automatic batch
    [default] = [r for r in saved["rows"] if r["name"].endswith("fit, default (auto batch, compile=auto)")]
    assert saved["auto_batch"] == default["batch"], (saved["auto_batch"], default["batch"])
    check = saved["batch_check"]
    assert check["samples_seen"] > 0 and math.isfinite(check["ratio"]) and check["ratio"] > 0
    assert set(saved["goals"]["fit_over_bare"]) == {"batch 256, off", "batch 512, off"}
    # the hyperprior's training step per variant (gpu_session picks the training settings from these)
    speed = {r["label"]: r for r in saved["codec_speed"]}
    assert {"batch 16 (recipe)", "batch 16, bf16 transforms", "batch 64"} <= set(speed)
    assert all(r["steps_per_s"] > 0 and r["finite"] for r in speed.values())
    assert speed["batch 16 (recipe)"]["first_loss_rel_diff"] == 0
    assert speed["batch 16, channels-last"]["first_loss_rel_diff"] < 1e-4  # the same arithmetic, another layout
    assert 0 < speed["batch 16, bf16 transforms"]["first_loss_rel_diff"] < 0.05
    assert saved["codec_profile"]["ops_per_step"] > 0 and "Self CPU" in saved["codec_profile"]["profile_device"]
    assert "Hyperprior training step" in (tmp_path / "gpu_train.md").read_text()


def test_gpu_train_benchmark_imports_only_torch_numpy_safetensors_and_models():
    """What runs on a bare GPU machine: the standard library, torch, numpy, safetensors and models/
    at module level (lazy imports inside functions, e.g. the entropy coder's, are not run by it)."""
    import ast

    allowed = {"torch", "numpy", "safetensors", "models", "__future__"} | set(sys.stdlib_module_names)
    for path in [ROOT / "benchmarks" / "gpu_train.py", *sorted((ROOT / "models").glob("*.py"))]:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            bad = [n for n in names if n.split(".")[0] not in allowed]
            assert not bad, f"{path.name} imports {bad}"
