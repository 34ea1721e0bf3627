#!/usr/bin/env bash
# Reproduce the bundled default model from the bundled real digits, on a CPU.
# Run from the repository root with the virtual environment active
# (`python3 scripts/run.py test` creates .venv; then `source .venv/bin/activate`).
set -euo pipefail
WORK=${1:-digits-work}

sundae data digits "$WORK/images" --split train
sundae train vqgan recipes/digits.toml --data "$WORK/images" --out "$WORK/autoencoder"
sundae encode "$WORK/images" --out "$WORK/latents.h5" --model "$WORK/autoencoder" \
    --no-flip --labels-from-subfolders --batch-size 128
sundae train prior recipes/digits.toml --latents "$WORK/latents.h5" --out "$WORK/prior"
python scripts/bundle_model.py "$WORK/autoencoder" "$WORK/prior"
