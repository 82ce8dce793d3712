#!/usr/bin/env bash
# SFT tokens/s in float32 vs bfloat16 on a tiny random Llama (hidden 256, 4 layers): one thread,
# 8 steps of batch 8, median of steps 3 to 8. Usage: bash bench/sft_dtype.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
OMP_NUM_THREADS=1 "$PY" - "$W" <<'PYCODE'
import sys
from prefgym.io import write_jsonl
from prefgym.models.tiny import make_tiny_checkpoint
w = sys.argv[1]
make_tiny_checkpoint(f"{w}/base", "llama", hidden_size=256, num_layers=4, num_heads=4)
write_jsonl(f"{w}/demos.jsonl", [{"instruction": f"Write a long list of numbers starting at {i}.", "input": "",
            "output": " ".join(str(i + j) for j in range(60))} for i in range(64)])
PYCODE
for dt in float32 bfloat16; do
  OMP_NUM_THREADS=1 "$PY" -m prefgym.cli sft --model "$W/base" --data "$W/demos.jsonl" --out "$W/$dt" --max-steps 8 \
    --batch-size 8 --max-length 256 --no-progress --set dtype=$dt > /dev/null 2>&1
  "$PY" -c "import json, statistics; r = [json.loads(l) for l in open('$W/$dt/metrics.jsonl')][2:]; print('$dt', 'tokens/s', round(statistics.median(x['tokens_per_s'] for x in r)))"
done
