#!/usr/bin/env bash
# The issue-2 results: `mira compare` on Dolly-15k and on 8 Natural Instructions v1 tasks,
# six algorithms plus mira with the similarity graph, 3 seeds, stories260K.
# Usage: MIRA_ASSETS=../shared bash benchmarks/run_compare.sh   (writes runs/compare-*/)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MIRA_ASSETS:?set MIRA_ASSETS to the folder holding data/ and models/}"
ALGOS="local,fedit,fedprox,ffa_lora,mira,centralized,mira:graph=similarity"
for name in dolly natural_instructions; do
  .venv/bin/mira compare "examples/$name.yaml" --algorithms "$ALGOS" --seeds 0,1,2 --out "runs/compare-$name" -q
  cp "runs/compare-$name/comparison.json" "benchmarks/results/compare-$name.json"
  cp "runs/compare-$name/comparison.md" "benchmarks/results/compare-$name.md"
done
