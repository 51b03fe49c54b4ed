"""Held-out KL / top-1 agreement of the Llamba `init` student before and after MOHAWK's closed-form stage 0.

    THINKFAST_DATA_DIR=../shared/data python scripts/calibration_check.py --teacher ~/.cache/thinkfast/teachers/smollm2-135m-instruct \
        --out runs/calibration_check.json          # 2 CPU cores: ~5 min

Calibrates on 8 packed training rows of 512 tokens, evaluates on 4 held-out rows of 1024 (train problems never
used for calibration); prints and writes JSON.
"""
import argparse, json, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import AutoModelForCausalLM, AutoTokenizer
from distill.cli import load_recipe, prepare_data, eval_batches
from distill.trainer import evaluate
from distill.mohawk import calibrate_mixers
from distill.data import PackedStream
from harness_ext.models.init_from_teacher import init_student
ap = argparse.ArgumentParser()
ap.add_argument("--teacher", required=True, help="HF Llama teacher (thinkfast teacher --out ...)")
ap.add_argument("--out", required=True, help="JSON to write")
args = ap.parse_args()
T = args.teacher
device = "cuda" if torch.cuda.is_available() else "cpu"
tok = AutoTokenizer.from_pretrained(T)
teacher = AutoModelForCausalLM.from_pretrained(T, dtype=torch.float32).to(device).eval()
recipe = load_recipe("llamba")
docs, held = prepare_data(recipe, tok, T, Path(args.out).parent)
evb = eval_batches(held, 1024, 4, 1)
calib = {k: v.to(device) for k, v in PackedStream(docs, 512, seed=1).rows(range(8)).items()}
student = init_student(T, "llamba").to(device).eval()
out = {}
out["init"] = evaluate(student, teacher, evb); print("init", out["init"], flush=True)
t0 = time.time()
rows = calibrate_mixers(student, teacher, calib)
out["calibration_seconds"] = time.time() - t0
out["calibrated"] = evaluate(student, teacher, evb); print("calibrated", out["calibrated"], f"{out['calibration_seconds']:.0f}s", flush=True)
out["mean_residual_before"] = sum(r["residual_before"] for r in rows) / len(rows)
out["mean_residual_after"] = sum(r["residual_after"] for r in rows) / len(rows)
Path(args.out).write_text(json.dumps(out, indent=1))
print(out)
