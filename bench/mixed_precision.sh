#!/usr/bin/env bash
# SmolLM2-135M in pure bf16 weights (dtype bfloat16) vs float32 weights + bf16 mixed precision vs
# float32. SFT with LoRA: tokens/s (median of steps 3 to 8, 8 steps of batch 8, about 200 tokens
# each) and peak RSS of the whole command, each setting ROUNDS times, interleaved. Then rollout
# sampling (`common.sample_responses`, as PPO / RLOO sample; mixed precision: under autocast):
# 8 prompts x 48 new tokens, sampled tokens/s (median of 3).
# Usage: bash bench/mixed_precision.sh [model folder, default models/smollm2]
#   (prefgym models import-gguf smollm2 --out models/smollm2 makes it); THREADS=2 when nothing else runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=${1:-models/smollm2}
THREADS=${THREADS:-1}
ROUNDS=${ROUNDS:-2}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
"$PY" - "$W" <<'PYCODE'
import sys
from prefgym.io import write_jsonl
write_jsonl(f"{sys.argv[1]}/demos.jsonl", [{"instruction": f"Write a long list of numbers starting at {i}.", "input": "",
            "output": " ".join(str(i + j) for j in range(60))} for i in range(64)])
PYCODE
declare -A SETTINGS=([bf16-weights]="--set dtype=bfloat16" [fp32+mixed-bf16]="--set dtype=float32 --mixed-precision bf16"
                     [fp32]="--set dtype=float32")
for round in $(seq "$ROUNDS"); do
  for name in bf16-weights fp32+mixed-bf16 fp32; do
    out="$W/$name-$round"
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=$THREADS /usr/bin/time -f "%M" -o "$W/rss" "$PY" -m prefgym.cli sft --model "$MODEL" \
      --data "$W/demos.jsonl" --out "$out" --max-steps 8 --batch-size 8 --max-length 256 --no-progress \
      --set use_lora=true --set lr=2e-4 ${SETTINGS[$name]} > /dev/null 2>&1
    "$PY" -c "import json, statistics; r = [json.loads(l) for l in open('$out/metrics.jsonl')]
print('$name', 'round $round', 'tokens/s', round(statistics.median(x['tokens_per_s'] for x in r[2:])),
      'peak RSS MiB', round(int(open('$W/rss').read().split()[-1]) / 1024), 'loss step 8', round(r[-1]['loss'], 4))"
  done
done
for name in bf16-weights fp32+mixed-bf16 fp32; do
  OMP_NUM_THREADS=$THREADS "$PY" - "$MODEL" "$name" 2> /dev/null <<'PYCODE'
import contextlib, statistics, sys, time
import torch
from prefgym.methods import common
from prefgym.methods.fields import TrainFields
from prefgym.models import load_model_and_tokenizer
model_dir, name = sys.argv[1:3]
model, tok = load_model_and_tokenizer(model_dir, cfg=TrainFields(dtype="bfloat16" if name == "bf16-weights" else "float32"))
autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if name == "fp32+mixed-bf16" else contextlib.nullcontext
prompts = [f"Write a long list of numbers starting at {i}." for i in range(8)]
rates = []
for _ in range(3):
    t0 = time.perf_counter()
    with autocast():
        _, _, responses = common.sample_responses(model, tok, prompts, seeds=list(range(8)), temperature=1.0,
                                                  max_new_tokens=48, max_prompt_length=64)
    rates.append(responses.numel() / (time.perf_counter() - t0))
print(name, "sampling tokens/s", round(statistics.median(rates), 1))
PYCODE
done
