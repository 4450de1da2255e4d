#!/usr/bin/env bash
# Regenerate docs/img/masks_<strategy>.png for every strategy `mim masks --list` finds (rerun when one lands).
#   scripts/mask_pictures.sh                 # writes docs/img/masks_*.png
#   MIM=mim OUT=/tmp/pics scripts/mask_pictures.sh
# Images: 14x14 tokens, 6 samples, seed 0; tube and dual on 8x14x14 as a frame strip (8 px cells);
# feature_subset on a 54-feature table (T-JEPA's Jannis), as it is a table strategy.
set -euo pipefail
cd "$(dirname "$0")/.."
MIM=${MIM:-.venv/bin/mim}
OUT=${OUT:-docs/img}
for strategy in $($MIM masks --list); do
  case "$strategy" in
    tube | dual) args=(--grid 14x14 --frames 8 --cell 8) ;;
    feature_subset) args=(--grid 54) ;;
    *) args=(--grid 14x14) ;;
  esac
  $MIM masks --strategy "$strategy" "${args[@]}" --samples 6 --seed 0 --out "$OUT/masks_$strategy.png"
done
