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
# The recipe's 3,000 prior steps give a usable model in under 30 minutes end to end;
# the bundled prior trained three times longer (about 50 minutes more on 2 cores).
sundae train prior recipes/digits.toml --latents "$WORK/latents.h5" --out "$WORK/prior" \
    --set train.prior.steps=9000
python scripts/bundle_model.py "$WORK/autoencoder" "$WORK/prior"
