#!/usr/bin/env bash
# Regenerate docs/img/masks_<strategy>.png for every strategy `mim masks --list` finds (rerun when one lands).
#   scripts/mask_pictures.sh                 # writes docs/img/masks_*.png
#   MIM=mim OUT=/tmp/pics scripts/mask_pictures.sh
# Images: 14x14 tokens, 8 samples side by side (4 x 2), seed 0. Tube and dual: 8x14x14, 6 samples, one frame strip
# (8 time slots) per sample, 8 px cells; multi (V-JEPA's two masks) the same, masks_multi.png and masks_multi_set1.png. feature_subset: a 54-feature table (T-JEPA's Jannis), one sample per row.
# Every picture has a caption (grid, strategy, colour legend); see mim/viz.py for the layout.
set -euo pipefail
cd "$(dirname "$0")/.."
MIM=${MIM:-.venv/bin/mim}
OUT=${OUT:-docs/img}
for strategy in $($MIM masks --list); do
  case "$strategy" in
    tube | dual | multi) args=(--grid 14x14 --frames 8 --cell 8 --samples 6) ;;  # multi: V-JEPA, two pictures
    feature_subset) args=(--grid 54 --samples 6) ;;
    hard_patch) args=(--grid 14x14 --samples 8 --progress 1) ;;  # end of training: half the hidden budget is hard
    *) args=(--grid 14x14 --samples 8) ;;
  esac
  $MIM masks --strategy "$strategy" "${args[@]}" --seed 0 --out "$OUT/masks_$strategy.png"
done
