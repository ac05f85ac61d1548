"""One lent GPU session's work, prepared: the GPU-speed benchmark, then the hyperprior's training.

A lent GPU comes for about 15 minutes, the machine's start included, with only torch, numpy and
safetensors that matter here (no Prefect, no Dask), and returns at most 8 files. This runs, in
order, each as its own process with a deadline:

1. ``benchmarks.gpu_train`` (issue 16) into ``OUT/gpu_train`` (2 files), its rows bounded by
   ``--gpu-train-s``;
2. ``benchmarks.train_codec --kind hyperprior`` with the fastest training step that stage 1 measured
   (``gpu_train``'s hyperprior rows: batch, channels-last, bf16 transforms; :func:`codec_choice`) (issue 18) from the committed hyperprior
   (``--init benchmarks/weights/hyperprior``: its lineage carries on) into ``OUT/hyperprior``
   (5 files: weights, config, log, resumable state) for the minutes left, 256x256 crops of the
   training photographs of ``--images`` (``train_codec.py --save-images``; carry the file, it is
   ignored by git), the settings of the earlier GPU runs unless given after ``--``.

and writes ``OUT/session.log`` (what ran, how long, exit codes). Example on the device machine
(carry ``benchmarks/_work/codec_train.npz``)::

    PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_session --out $OUT --minutes 9   # run(timeout_s=600)

then, here: copy ``OUT/hyperprior`` over ``benchmarks/weights/hyperprior`` (without the state
files) only if ``python -m benchmarks.quality_compress`` says it is better on the held-out
photographs (BD-rate vs JPEG; its saturated-colour row reported beside it), and put ``OUT/gpu_train/gpu_train.md`` in ``benchmarks/RESULTS.md``.
``--cpu-smoke`` runs both stages at toy sizes on the CPU (a check of the wiring, ~1 minute).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Transform training as in the committed model's GPU runs (benchmarks/RESULTS.md, hyperprior section), and a quarter
# of the crops colour-augmented (permuted channels, raised saturation): the committed transforms cannot reproduce
# saturated colours (pure green came back as (41, 156, 38); quality_compress's saturated-colour row).
CODEC_GPU = ["--device", "cuda", "--patch", "256", "--batch", "16", "--lr", "1e-4", "--hyper-lr", "1e-3",
             "--decay-at", "0.8", "--scales", "1,0.7,0.5", "--save-every", "120", "--colour-aug", "0.25"]
CODEC_SMOKE = ["--device", "cpu", "--patch", "64", "--batch", "2", "--lr", "1e-4", "--hyper-lr", "1e-3",
               "--scales", "1", "--save-every", "600", "--threads", "1", "--colour-aug", "0.25"]
FINAL_SAVE_S = 45  # train_codec's last save and, on CUDA, its device check
# Switching from the recipe's step needs this speed-up (crops/s): a layout that computes the same (channels-last),
# a bf16 one (its first loss within BF16_LOSS_TOL of the recipe's), a larger batch (at least MIN_STEP_RATE of the
# recipe's steps/s: more crops per step, not many fewer steps).
SAME_MATH_GAIN, BF16_GAIN, BF16_LOSS_TOL, MIN_STEP_RATE = 1.10, 1.30, 0.02, 0.6


def codec_choice(gpu_train_json: Path) -> tuple[list[str], str]:
    """train_codec options for the fastest measured training step (``gpu_train.json``'s ``codec_speed``), and why."""
    try:
        rows = {r["label"]: r for r in json.loads(gpu_train_json.read_text()).get("codec_speed", [])}
    except (OSError, ValueError) as e:
        return [], f"the recipe's step (no measurements: {e})"
    recipe = rows.get("batch 16 (recipe)")
    if not recipe or not recipe["finite"]:
        return [], "the recipe's step (not measured)"
    layout, best = recipe, recipe["samples_per_s"]
    for r in rows.values():
        if r["batch"] != recipe["batch"] or not r["finite"] or r is recipe:
            continue
        need = BF16_GAIN if r["bf16_transforms"] else SAME_MATH_GAIN
        if r["bf16_transforms"] and r["first_loss_rel_diff"] > BF16_LOSS_TOL:
            continue
        if r["samples_per_s"] >= need * recipe["samples_per_s"] and r["samples_per_s"] > best:
            layout, best = r, r["samples_per_s"]
    batch = max((r for r in rows.values() if r["finite"] and not r["channels_last"] and not r["bf16_transforms"]
                 and r["steps_per_s"] >= MIN_STEP_RATE * recipe["steps_per_s"]), key=lambda r: r["samples_per_s"])
    args = ["--batch", str(batch["batch"])]
    args += ["--channels-last"] if layout["channels_last"] else []
    args += ["--bf16-transforms"] if layout["bf16_transforms"] else []
    why = (f"{layout['label']} ({layout['samples_per_s'] / recipe['samples_per_s']:.2f}x the recipe's crops/s), "
           f"batch {batch['batch']} ({batch['samples_per_s'] / recipe['samples_per_s']:.2f}x crops/s, "
           f"{batch['steps_per_s']:.1f} steps/s against {recipe['steps_per_s']:.1f})")
    return args, why


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="where the files go ($OUT on the device machine)")
    ap.add_argument("--minutes", type=float, default=9.0,
                    help="wall time for both stages together (a device command runs at most 10 minutes)")
    ap.add_argument("--gpu-train-s", type=float, default=170.0, help="gpu_train's --budget-s")
    ap.add_argument("--codec-step", choices=("fastest", "recipe"), default="fastest",
                    help="the hyperprior's training step: the fastest gpu_train measured, or the earlier runs' recipe")
    ap.add_argument("--init", default="benchmarks/weights/hyperprior", help="the hyperprior to continue")
    ap.add_argument("--images", default="benchmarks/_work/codec_train.npz", help="training photographs (.npz)")
    ap.add_argument("--cpu-smoke", action="store_true", help="both stages at toy sizes on the CPU")
    ap.add_argument("codec_args", nargs=argparse.REMAINDER, help="after --: more train_codec options (they win)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_end = time.time() + args.minutes * 60
    log = open(out / "session.log", "a", buffering=1)

    def say(msg: str) -> None:
        line = f"[gpu_session {time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log.write(line + "\n")

    def stage(name: str, cmd: list[str], limit_s: float) -> int:
        say(f"{name}: {' '.join(cmd)} (at most {limit_s:.0f} s)")
        t = time.time()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, timeout=max(1.0, limit_s), env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        except subprocess.TimeoutExpired:
            rc = 124
        say(f"{name}: exit {rc} after {time.time() - t:.0f} s")
        return rc

    py = sys.executable
    bench = [py, "-m", "benchmarks.gpu_train", "--out", str(out / "gpu_train")]
    bench += ["--cpu-smoke"] if args.cpu_smoke else ["--budget-s", str(args.gpu_train_s)]
    rc_bench = stage("gpu_train", bench, args.gpu_train_s + 90 if not args.cpu_smoke else 120)

    extra = [a for a in args.codec_args if a != "--"]
    left_min = (t_end - time.time() - FINAL_SAVE_S) / 60
    if args.cpu_smoke:
        left_min = 0.1
    if left_min < 0.5 and not args.cpu_smoke:
        say(f"no time left for the hyperprior ({left_min:.1f} min)")
        return rc_bench
    chosen: list[str] = []
    if args.codec_step == "fastest":
        chosen, why = codec_choice(out / "gpu_train" / "gpu_train.json")
        say(f"hyperprior training step: {why}: {' '.join(chosen) or 'the recipe'}")
    codec = [py, "-m", "benchmarks.train_codec", "--kind", "hyperprior", "--init", args.init, "--out", str(out / "hyperprior"),
             "--minutes", f"{left_min:.2f}", *(CODEC_SMOKE if args.cpu_smoke else CODEC_GPU), *chosen, *extra]
    if args.images and os.path.exists(ROOT / args.images):
        codec += ["--images", args.images]
    else:
        say(f"{args.images} not found: the photographs come from the installed packages")
    rc_codec = stage("train_codec", codec, left_min * 60 + FINAL_SAVE_S + 120)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    say(f"files: {', '.join(files)} ({len(files)}; the device returns at most 8)")
    return rc_bench or rc_codec


if __name__ == "__main__":
    sys.exit(main())
