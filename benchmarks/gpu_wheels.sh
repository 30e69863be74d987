#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh needs on a GPU machine that has PyTorch, JAX, numpy, pandas,
# scikit-learn, scipy, matplotlib, ... but no TensorFlow, Keras, MLflow or Optuna, and no internet:
#   <repo>/.whl/                          the missing Python wheels (CPython 3.12, x86_64 manylinux)
#   <repo>/.gpu_data/cifar-10-batches-py  a copy of the CIFAR-10 sample (the b5 step trains on it)
# Run it here (any folder), then carry both folders:  bash benchmarks/gpu_wheels.sh
# Env: PYTHON (the pip to download with, default python3), CIFAR10_SAMPLE_DIR (the sample's folder).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
SAMPLE=${CIFAR10_SAMPLE_DIR:-$ROOT/../shared/data/cifar10-sample/cifar-10-batches-py}

# Only what is not on the machine already (KINDS.md's package list there), with --no-deps: every
# dependency is named here. Versions: the ones this project pins or resolves to in its own venv.
WHEELS=(
  keras==3.15.1 namex==0.1.0 optree==0.20.0                     # Keras 3 (JAX and PyTorch are there)
  # mlflow-skinny is the whole `mlflow` package (tracking, SQL stores, registry, keras and pyfunc
  # flavours) without the UI: 4 MB. The full `mlflow` wheel needs it too, and adds 11.5 MB of UI
  # plus the server's dependencies (Flask, graphene, gunicorn, docker, ...), which train/tune never use.
  mlflow-skinny==3.17.2 sqlparse==0.6.1 cachetools==7.3.3 python-dotenv==1.2.4 importlib-metadata==9.1.0
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2
  fastapi==0.165.0 starlette==1.10.0   # `import mlflow` imports mlflow.gateway, which imports fastapi
  databricks-sdk==0.162.0              # `import mlflow` looks for the `databricks` namespace package
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12  # the SQL model registry store imports Fernet
  sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3   # the sqlite tracking store and Optuna's RDB storage
  optuna==5.0.0 optuna-integration==5.0.0 colorlog==6.12.0
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
)
PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done

rm -rf .whl && mkdir .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"

# The sample: read-only where it lies, so copy it writable (a carried folder is replaced on each run).
rm -rf .gpu_data && mkdir -p .gpu_data
cp -r "$SAMPLE" .gpu_data/cifar-10-batches-py && chmod -R u+w .gpu_data

# Limits: the wheels under 60 MiB (issue 17), and everything a device call sends (the working tree
# without .venv and .git, plus both carried folders) under the tool's 64 MiB.
mib() { du -sb "$@" | awk '{s += $1} END {printf "%.1f", s / 1048576}'; }
wheels=$(mib .whl)
sent=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | awk '{printf "%.1f", $1 / 1048576}')
total=$(awk -v a="$wheels" -v b="$(mib .gpu_data)" -v c="$sent" 'BEGIN {printf "%.1f", a + b + c}')
echo "$(ls .whl | wc -l) wheels, $wheels MiB in .whl; sample $(mib .gpu_data) MiB; working tree $sent MiB; sent in all $total MiB"
awk -v w="$wheels" 'BEGIN {exit !(w < 60)}' || { echo "ERROR: .whl is $wheels MiB, over the 60 MiB limit" >&2; exit 1; }
awk -v t="$total" 'BEGIN {exit !(t < 64)}' || { echo "ERROR: $total MiB would travel, over the device's 64 MiB" >&2; exit 1; }
