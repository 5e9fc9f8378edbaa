#!/usr/bin/env bash
# MIRA against its baselines on Dolly-15k (5 categories) and on 8 Natural Instructions v1 tasks,
# six algorithms plus mira with the similarity graph, 3 seeds (each seed also draws its own data
# sample), stories260K, prompts intact (see `mira data inspect examples/<name>.yaml`).
# Usage: MIRA_ASSETS=../shared bash benchmarks/run_compare.sh [dolly|natural_instructions ...]
# Writes runs/compare-<name>/ and copies comparison.{json,md} to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MIRA_ASSETS:?set MIRA_ASSETS to the folder holding data/ and models/}"
ALGOS="local,fedit,fedprox,ffa_lora,mira,centralized,mira:graph=similarity"
NAMES=("$@")
[ ${#NAMES[@]} -eq 0 ] && NAMES=(dolly natural_instructions)
for name in "${NAMES[@]}"; do
  .venv/bin/mira compare "examples/$name.yaml" --algorithms "$ALGOS" --seeds 0,1,2 --out "runs/compare-$name" --overwrite -q
  cp "runs/compare-$name/comparison.json" "benchmarks/results/compare-$name.json"
  cp "runs/compare-$name/comparison.md" "benchmarks/results/compare-$name.md"
done
