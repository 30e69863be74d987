#!/usr/bin/env bash
# The prepared GPU check of issue 17 (item 7), for one NVIDIA H200 with PyTorch and JAX but no TensorFlow,
# Keras, MLflow or Optuna, and no internet: everything else comes as wheels (benchmarks/gpu_wheels.sh
# downloads them into .whl/ and copies the CIFAR-10 sample into .gpu_data/; carry both folders).
#
#   bash benchmarks/gpu_check.sh                     # on the GPU machine, from the repo root: under 6 minutes
#   GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh     # a dry run on a CPU: the venv's python, no install,
#                                                    # shorter steps, one at a time
#
# Steps, each under `timeout`: a failed or timed-out step is a row of the table, never the end of the check.
#   1. install the wheels into /tmp/site; record GPU, driver and versions
#   2. train `smoke` with --backend jax and --backend torch; train b5 on the real sample (jax, test accuracy);
#      4 tuning trials of `smoke` (jax). On the GPU these four run side by side (their wall times overlap).
#   3. benchmarks/gpu_throughput.py under JAX, then PyTorch, alone on the GPU: every factory's training
#      images/s at its catalogue resolution, the best of a short batch sweep, as a share of the peaks
#   4. one markdown table: printed, and written to $OUT/gpu_check.md (default ./gpu_check_out), with the
#      step logs (gpu_check.log) and the throughput measurements (throughput_<backend>.json) beside it
# Env: GPU_CHECK_CPU=1 (dry run), PYTHON (the interpreter; default python3, or .venv/bin/python with
# GPU_CHECK_CPU), GPU_CHECK_INSTALL=1|0 (install .whl into /tmp/site; default: not in a dry run),
# GPU_CHECK_PARALLEL=1|0 (step 2 side by side; default: on the GPU only), GPU_CHECK_DEADLINE (seconds
# after which no step runs on the GPU, default 345), GPU_CHECK_DATA (the cifar-10-batches-py folder;
# default .gpu_data/cifar-10-batches-py).
set -uo pipefail  # no -e: see above
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
WORK=$(mktemp -d)  # the steps' working folders: MLflow stores, Optuna journal, logs
DATA=${GPU_CHECK_DATA:-$ROOT/.gpu_data/cifar-10-batches-py}
SAMPLE_SPLIT=(--set data.train_size=3336 --set data.val_size=834)  # the sample's 4,170 images, 80/20
export MPLBACKEND=Agg PYTHONUNBUFFERED=1

if [[ ${GPU_CHECK_CPU:-0} == 1 ]]; then
  # Limits in seconds per step, the b5 epochs, trials, and the throughput sweep and budget per backend.
  PY=${PYTHON:-$ROOT/.venv/bin/python}; SCALE=4; B5_EPOCHS=2; TRIALS=2; PARALLEL=${GPU_CHECK_PARALLEL:-0}
  SWEEP=(--batch-sizes 32,64 --min-time 0.5 --max-steps 10); TP_BUDGET=(60 60); TP_SPARE=(30 30)
else
  PY=${PYTHON:-python3}; SCALE=1; B5_EPOCHS=30; TRIALS=4; PARALLEL=${GPU_CHECK_PARALLEL:-1}
  # TP_SPARE: the limit's seconds past the budget, for the case running when the budget ends
  SWEEP=(--batch-sizes 128,256,512 --min-time 1.0 --max-steps 100); TP_BUDGET=(75 55); TP_SPARE=(20 15)
fi
DEADLINE=${GPU_CHECK_DEADLINE:-345}  # seconds: no step runs past it (the limits below add up to 315, 340 with timeout's -k 5)

# step NAME BACKEND LIMIT_S COMMAND...: run COMMAND in $WORK/NAME under timeout, log to $WORK/NAME.log,
# and write its table row to $WORK/NAME.row: step, backend, status, seconds, result (tab-separated).
step() {
  local name=$1 backend=$2 limit=$(($3 * SCALE)) began=$SECONDS rc status
  shift 3
  if [[ $SCALE == 1 ]] && ((limit > DEADLINE - SECONDS)); then limit=$((DEADLINE - SECONDS)); fi
  if ((limit <= 0)); then
    printf '%s\t%s\t%s\t0\t%s\n' "$name" "$backend" "skipped" "no time left" > "$WORK/$name.row"
    return
  fi
  mkdir -p "$WORK/$name"
  (cd "$WORK/$name" && MLFLOW_TRACKING_URI="sqlite:///$WORK/$name/mlflow.db" timeout -k 5 "$limit" "$@") \
    > "$WORK/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="timed out (${limit} s)" ;;
    *) status="failed (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$backend" "$status" "$((SECONDS - began))" \
    "$(summarise "$name" $rc)" > "$WORK/$name.row"
  echo "[gpu_check] $name ($backend): $status in $((SECONDS - began)) s" >&2
}

# What a step's log says in one line: a training's test accuracy, policy, speed and registration; a
# tuning's trial counts and best trial; a failure's last line (the CLI's one-line error).
summarise() {
  local log=$WORK/$1.log
  if [[ $1 == throughput-* && ($2 == 124 || $2 == 137) ]]; then
    echo "stopped at its limit: the rows below are the measurements it had made"
    return
  fi
  if [[ $2 != 0 ]]; then  # the CLI's one-line error, else a traceback's exception, else the last line
    { grep -E '^(error: |[A-Za-z_.]*(Error|Exception)\b)' "$log" || grep -v '^\s*$' "$log"; } | tail -1 | cut -c1-300
    return
  fi
  case $1 in
    train-*)
      echo "$(grep -o 'test_accuracy=[0-9.]*' "$log" | tail -1)" \
        "($(sed -n 's/^\[cifar-mlops\] data: \([a-z0-9-]*\).*: \(.*\) images$/\1: \2/p' "$log" | tail -1));" \
        "$(sed -n 's/^\[cifar-mlops\] model //p' "$log" | tail -1);" \
        "last epoch $(grep -o '[0-9.]*m\?s/step' "$log" | tail -1);" \
        "$(sed -n 's/^\[cifar-mlops\] \(registered .*\)/\1/p' "$log" | tail -1)" ;;
    tune-*)
      echo "$(grep -o '[0-9]* trials: .*' "$log" | tail -1); $(grep '^best: ' "$log" | tail -1 | cut -c1-160)" ;;
    *) tail -1 "$log" | cut -c1-300 ;;
  esac
}


# 1. Wheels and versions
if [[ ${GPU_CHECK_INSTALL:-$((1 - ${GPU_CHECK_CPU:-0}))} == 1 ]]; then
  step install - 30 bash -c "'$PY' -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site '$ROOT'/.whl/*.whl && '$PY' -m compileall -q -j 0 /tmp/site >/dev/null; \
    echo \$(ls '$ROOT'/.whl | wc -l) wheels installed into /tmp/site"
  export PYTHONPATH=/tmp/site:$ROOT
fi
step environment - 25 "$PY" -c "
import importlib, importlib.metadata as md, platform, shutil, subprocess
def v(name):
    try: return md.version(name)
    except md.PackageNotFoundError: return 'absent'
def devices(module, ask):
    try: return ask(importlib.import_module(module))
    except Exception as err: return f'not usable ({type(err).__name__}: {err})'
gpu = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total', '--format=csv,noheader'],
                     capture_output=True, text=True).stdout.strip() if shutil.which('nvidia-smi') else 'no nvidia-smi'
print(f'{gpu}; python {platform.python_version()}; jax {v(\"jax\")} {devices(\"jax\", lambda m: m.devices())}; '
      f'torch {v(\"torch\")} cuda {devices(\"torch\", lambda m: m.cuda.is_available())}; keras {v(\"keras\")}; '
      f'mlflow {v(\"mlflow\")}/skinny {v(\"mlflow-skinny\")}; optuna {v(\"optuna\")}; numpy {v(\"numpy\")}; '
      f'click {v(\"click\")}; protobuf {v(\"protobuf\")}; sqlite {devices(\"sqlite3\", lambda m: m.sqlite_version)}; '
      f'tensorflow {v(\"tensorflow\")}/cpu {v(\"tensorflow-cpu\")}')
"
command -v nvidia-smi >/dev/null && nvidia-smi > "$WORK/nvidia-smi.log" 2>&1

# 2. The CLI on the GPU (side by side there, each JAX process taking GPU memory as it needs it instead
# of 75% up front; one at a time on a CPU)
run() { if [[ $PARALLEL == 1 ]]; then XLA_PYTHON_CLIENT_PREALLOCATE=false step "$@" & else step "$@"; fi; }
run train-smoke-jax jax 95 "$PY" -m cifar_mlops.cli --backend jax train --exp smoke
run train-smoke-torch torch 95 "$PY" -m cifar_mlops.cli --backend torch train --exp smoke
# b5 on the sample; no checkpoints (each epoch's would write the model and optimizer state again)
run train-b5-sample jax 95 "$PY" -m cifar_mlops.cli --backend jax train --exp b5 --data-dir "$DATA" "${SAMPLE_SPLIT[@]}" \
  --set train.epochs=$B5_EPOCHS --set train.checkpoint_every=0
run tune-smoke jax 95 "$PY" -m cifar_mlops.cli --backend jax tune --exp smoke --trials $TRIALS --seed 0 \
  --storage "$WORK/tune-smoke/optuna.journal"
wait

# 3. Throughput, alone on the GPU, JAX then PyTorch; the script keeps its rows file current, so a
# timeout still leaves the cases it measured.
for i in 0 1; do
  backend=$([[ $i == 0 ]] && echo jax || echo torch)
  budget=${TP_BUDGET[i]}
  if [[ $SCALE == 1 ]] && ((budget > DEADLINE - SECONDS - TP_SPARE[i])); then
    budget=$((DEADLINE - SECONDS - TP_SPARE[i]))  # earlier steps ran long: measure less, still end in time
  fi
  if ((budget <= 0)); then
    printf '%s\t%s\tskipped\t0\tno time left\n' "throughput-$backend" "$backend" > "$WORK/throughput-$backend.row"
    continue
  fi
  KERAS_BACKEND=$backend step "throughput-$backend" "$backend" $((budget + TP_SPARE[i])) "$PY" \
    "$ROOT/benchmarks/gpu_throughput.py" "${SWEEP[@]}" --budget "$budget" \
    --rows "$WORK/throughput-$backend.rows" --json "$OUT/throughput_$backend.json"
done

# 4. The table: the steps in order, each throughput step followed by its cases
{
  echo "GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), $(sed -n 1p "$WORK/environment.row" | cut -f5 | cut -d';' -f1)"
  echo
  echo "| step | backend | status | s | result |"
  echo "|---|---|---|---|---|"
  for name in install environment train-smoke-jax train-smoke-torch train-b5-sample tune-smoke \
              throughput-jax throughput-torch; do
    for rows in "$WORK/$name.row" "$WORK/$name.rows"; do
      [[ -f $rows ]] && tr '|' '/' < "$rows" | awk -F'\t' '{printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5}'
    done
  done
  echo "| total | | | $SECONDS | wall seconds of the whole check |"
  echo
  [[ $PARALLEL == 1 ]] && echo "The four train/tune steps ran side by side: their seconds overlap."
  echo "Throughput: synthetic uint8 images, bare \`model.compile(optimizer=\"adam\", loss=\"categorical_crossentropy\")\`" \
    "+ \`fit\`; FLOPs per trained image = 3 x the forward Conv2D/DepthwiseConv2D/Dense multiply-adds x 2;" \
    "shares of the H200 SXM dense peaks (989 TFLOP/s bf16, 67 fp32; a bf16 matmul reaches about 790 on this" \
    "H200), or on a CPU of its fp32 peak from lscpu (benchmarks/common.py)."
} > "$OUT/gpu_check.md"
for log in "$WORK"/*.log; do echo "===== $(basename "$log")"; tail -n 150 "$log"; done > "$OUT/gpu_check.log"
cat "$OUT/gpu_check.md"
rm -rf "$WORK"
