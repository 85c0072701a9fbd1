#!/usr/bin/env bash
# GPU check: both trainers on a random-initialised ~1B Llama in bf16, single GPU, plain and under
# DeepSpeed ZeRO-2 / ZeRO-3 (one process), printing tokens/s, MFU and peak memory per run.
# Meant for a GPU machine without internet; about 6 minutes on an H100.
# SET=levers STEPS=50: eager vs compiled transformer blocks instead (about 4 minutes);
# SET=levers2 STEPS=40: compiled at batch 192, under ZeRO-2, and an operator profile;
# SET=levers3 STEPS=60 BASE=DIR: the code in BASE (an earlier checkout: the baseline) against this one,
#     compiled step 2 and step 1, then narrower padding and a steady-state operator profile (about 6 minutes);
# SET=levers4 STEPS=60: batches collated by data-loader workers, ahead of the step (about 4 minutes);
# SET=levers5 STEPS=60 [BASE=DIR]: host syncs: step 2 with the collator's index plan and without
#     HF's NaN filter, against neither (and against BASE's code), plus a census of the syncs left;
# SET=levers6 STEPS=60: packed step-2 batches (no padding, FlashAttention varlen) against padded ones, with
#     the loss of one batch both ways, SDPA without cuDNN, repeats, and a profile of the packed step;
# SET=install: only install the carried wheels (into /tmp/site), for a command of your own.
#
#   bash bench/gpu_check.sh                  # results as JSON lines in $OUT/gpu_check.jsonl
#
# Preparation on a machine with internet, in the repository root (wheels for Python 3.12):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl transformers==5.24.0 peft==0.21.2 trl==1.16.0 \
#       usearch==2.26.6 numkong schedule==1.2.2 gguf==0.19.0 hjson pydantic pydantic-core annotated-types \
#       typing-inspection
#   pip download --no-deps --no-binary :all: deepspeed==0.19.8 -d /tmp/ds && \
#       DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation /tmp/ds/deepspeed-0.19.8.tar.gz -w .whl
#   python -c "from transformers import AutoTokenizer; from recall.model_loading import materialize, \
#       resolve_model_source as r; AutoTokenizer.from_pretrained(materialize(r())).save_pretrained('.whl/tokenizer')"
# and bring .whl/ along. Wheels are installed (into /tmp/site, ahead on PYTHONPATH) only when a
# package is missing or not at the pinned version.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${SET:-all}" in all|levers|levers2|levers3|levers4|levers5|levers6|install) ;; *)
  echo "SET: all | levers | levers2 | levers3 | levers4 | levers5 | levers6 | install, got $SET"; exit 2;; esac
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: SET=levers3 runs the baseline from another directory
RESULTS="$OUT/gpu_check.jsonl"
: > "$RESULTS"
: > "$OUT/gpu_check.log"
WHEELS=$(realpath -m "${WHEELS:-.whl}")
PY=${PYTHON:-python3}
SIZE=${SIZE:-1b}
STEPS=${STEPS:-100}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

need_install=$("$PY" - <<'EOF'
import importlib.metadata as md
pins = {"transformers": "5.24.0", "peft": "0.21.2", "trl": "1.16.0", "deepspeed": "0.19.8", "usearch": "2.26.6",
        "schedule": "1.2.2", "gguf": "0.19.0"}
bad = []
for name, version in pins.items():
    try:
        if md.version(name) != version:
            bad.append(f"{name} {md.version(name)} (pinned {version})")
    except md.PackageNotFoundError:
        bad.append(f"{name} missing")
print("; ".join(bad))
EOF
)
if [ -n "$need_install" ]; then
  echo "installing carried wheels: $need_install"
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS (see the preparation steps at the top)"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$WHEELS"/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
TOK=()
[ -d "$WHEELS/tokenizer" ] && TOK=(--tokenizer "$WHEELS/tokenizer")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers, peft, deepspeed; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__, 'deepspeed', deepspeed.__version__)"

run() {  # label, then bench.gpu_train arguments
  local label=$1; shift
  echo "== $label"
  local started=$SECONDS
  timeout "${RUN_TIMEOUT:-150}" "$@" --size "$SIZE" "${TOK[@]}" --json "$RESULTS" 2>&1 | tee -a "$OUT/gpu_check.log" | grep -E '^\{"step"|Error|error|Traceback' \
      | tail -5
  echo "   ($((SECONDS - started)) s)"
}
single=("$PY" -m bench.gpu_train)
ds=("$PY" -m torch.distributed.run --nproc_per_node 1 --master_port 29611 -m bench.gpu_train)

[ "${SET:-all}" = install ] && { echo "wheels ready (PYTHONPATH=${PYTHONPATH:-})"; exit 0; }
if [ "${SET:-all}" = levers ]; then  # eager vs regional torch.compile (--compile_layers), same run
  run "step 2, plain bf16, batch 64 (+ matmul peak)" "${single[@]}" --step decode --batch 64 --steps "$STEPS" --peak
  run "step 2, compiled blocks, batch 64, pad to 64" "${single[@]}" --step decode --batch 64 --steps "$STEPS" \
      --compile_layers --pad_multiple 64
  run "step 2, compiled blocks, batch 128, pad to 64, length-grouped" "${single[@]}" --step decode --batch 128 \
      --steps "$STEPS" --compile_layers --pad_multiple 64 --length_grouping
  run "step 1, compiled blocks, batch 128" "${single[@]}" --step recall --batch 128 --steps "$STEPS" --compile_layers
elif [ "${SET:-all}" = levers2 ]; then  # compiled: larger batch, under ZeRO-2, and an operator profile
  run "step 2, compiled blocks, batch 192, pad to 64, length-grouped" "${single[@]}" --step decode --batch 192 \
      --steps "$STEPS" --compile_layers --pad_multiple 64 --length_grouping
  run "step 2, compiled blocks, ZeRO-2, batch 128" "${ds[@]}" --step decode --batch 128 --steps "$STEPS" \
      --compile_layers --pad_multiple 64 --length_grouping --deepspeed ds_configs/zero2.json
  run "step 2, compiled blocks, batch 128, profiled (not a throughput figure)" "${single[@]}" --step decode \
      --batch 128 --steps 8 --warmup 6 --compile_layers --pad_multiple 64 --length_grouping \
      --profile "$OUT/gpu_profile_compiled_b128.txt"
elif [ "${SET:-all}" = levers3 ]; then  # this checkout against the one in $BASE, same flags, same machine
  [ -d "${BASE:-}/bench" ] || { echo "SET=levers3 needs BASE=<an earlier checkout of this repository>"; exit 2; }
  d2=(--step decode --batch 128 --steps "$STEPS" --compile_layers --length_grouping)
  (cd "$BASE" && run "BASELINE step 2, compiled, batch 128, pad to 64, length-grouped" "${single[@]}" "${d2[@]}" \
      --pad_multiple 64 --peak --work /tmp/gpu_base)
  run "step 2, compiled, batch 128, pad to 64, length-grouped" "${single[@]}" "${d2[@]}" --pad_multiple 64
  run "step 2, compiled, batch 128, pad to 16, length-grouped" "${single[@]}" "${d2[@]}" --pad_multiple 16
  (cd "$BASE" && run "BASELINE step 1, compiled, batch 128" "${single[@]}" --step recall --batch 128 \
      --steps "$STEPS" --compile_layers --work /tmp/gpu_base)
  run "step 1, compiled, batch 128" "${single[@]}" --step recall --batch 128 --steps "$STEPS" --compile_layers
  run "step 2, compiled, batch 128, pad to 16, profiled (not a throughput figure)" "${single[@]}" --step decode \
      --batch 128 --steps 8 --warmup 6 --compile_layers --pad_multiple 16 --length_grouping \
      --profile "$OUT/gpu_profile_levers3.txt"
elif [ "${SET:-all}" = levers4 ]; then  # collation in the training process vs in worker processes
  d2=(--step decode --batch 128 --steps "$STEPS" --compile_layers --length_grouping --pad_multiple 16)
  run "step 2, compiled, batch 128, pad to 16, length-grouped, collated in-process" "${single[@]}" "${d2[@]}"
  run "step 2, same, 4 data-loader workers" "${single[@]}" "${d2[@]}" --workers 4
  run "step 1, compiled, batch 128, 4 data-loader workers" "${single[@]}" --step recall --batch 128 \
      --steps "$STEPS" --compile_layers --workers 4
  run "step 2, compiled, batch 192, pad to 16, length-grouped, 4 workers" "${single[@]}" --step decode --batch 192 \
      --steps "$STEPS" --compile_layers --length_grouping --pad_multiple 16 --workers 4
elif [ "${SET:-all}" = levers5 ]; then  # host syncs in the step: the index plan and the NaN filter
  d2=(--step decode --batch 128 --steps "$STEPS" --compile_layers --length_grouping --pad_multiple 16 --workers 4)
  if [ -d "${BASE:-}/bench" ]; then
    (cd "$BASE" && run "BASELINE step 2, compiled, batch 128, pad to 16, 4 workers" "${single[@]}" "${d2[@]}" \
        --peak --work /tmp/gpu_base)
  fi
  run "step 2, same, positions found on the device, NaN filter on" "${single[@]}" "${d2[@]}" --no_index_plan \
      --nan_filter
  run "step 2, same, collator index plan, no NaN filter (default)" "${single[@]}" "${d2[@]}"
  run "step 2, sync census of 8 steps, device-found positions (not a throughput figure)" "${single[@]}" \
      "${d2[@]}" --steps 12 --sync_census 8 --no_index_plan --nan_filter
  run "step 2, sync census of 8 steps, default (not a throughput figure)" "${single[@]}" "${d2[@]}" --steps 12 \
      --sync_census 8
  run "step 1, compiled, batch 128, 4 workers, no NaN filter" "${single[@]}" --step recall --batch 128 \
      --steps "$STEPS" --compile_layers --workers 4
elif [ "${SET:-all}" = levers6 ]; then  # packed batches vs padded, same flags otherwise
  d2=(--step decode --batch 128 --steps "$STEPS" --compile_layers --length_grouping --pad_multiple 16 --workers 4)
  run "step 2, packed, + loss padded vs packed on 64 samples" "${single[@]}" "${d2[@]}" --packing --check_packing 64
  run "step 2, padded (default)" "${single[@]}" "${d2[@]}"
  run "step 2, padded, SDPA without cuDNN" "${single[@]}" "${d2[@]}" --no_cudnn_attention
  run "step 2, packed (repeat)" "${single[@]}" "${d2[@]}" --packing
  run "step 2, padded (repeat)" "${single[@]}" "${d2[@]}"
  run "step 2, packed, profiled (not a throughput figure)" "${single[@]}" "${d2[@]}" --packing --steps 8 \
      --warmup 6 --profile "$OUT/gpu_profile_packed.txt"
else
  run "step 2, plain bf16, batch 32 (+ matmul peak)" "${single[@]}" --step decode --batch 32 --steps "$STEPS" --peak
  run "step 2, plain bf16, batch 64" "${single[@]}" --step decode --batch 64 --steps "$STEPS"
  run "step 1, plain bf16, batch 64" "${single[@]}" --step recall --batch 64 --steps "$STEPS"
  run "step 2, ZeRO-2, batch 32" "${ds[@]}" --step decode --batch 32 --steps $((STEPS / 2)) \
      --deepspeed ds_configs/zero2.json
  [ -f ds_configs/zero3.json ] && run "step 2, ZeRO-3, batch 32" "${ds[@]}" --step decode --batch 32 \
      --steps $((STEPS / 2)) --deepspeed ds_configs/zero3.json
fi
echo
"$PY" - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print("| step | setup | batch | compiled | tokens/s | TFLOP/s | MFU | MFU (6N) | peak GiB |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    setup = (r["deepspeed"] or "plain").split("/")[-1].replace(".json", "") + (", packed" if r.get("packing") else "")
    print(f"| {r['step']} | {setup} | {r['batch_per_device']} | {r.get('compile_layers', False)} | "
          f"{r['tokens_per_second']:.0f} | "
          f"{r['tflops_per_second']:.1f} | {r.get('mfu', float('nan')):.3f} | {r.get('mfu_6n', float('nan')):.3f} | "
          f"{r.get('peak_memory_gib', float('nan'))} |")
for r in rows:
    if "packing_check" in r:
        print(f"packing check (loss parts, padded vs packed): {json.dumps(r['packing_check'])}")
peak = [r for r in rows if "measured_peak_tflops" in r]
if peak:
    print(f"measured bf16 matmul peak: {peak[0]['measured_peak_tflops']} TFLOP/s "
          f"(nominal {peak[0].get('nominal_bf16_tflops')})")
EOF
