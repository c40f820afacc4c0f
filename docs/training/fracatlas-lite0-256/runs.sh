#!/usr/bin/env bash
# The screening runs of docs/training/fracatlas-lite0-256/NOTES.md, like for like: the
# split of fracatlas-resnet18-e50, 256 px, 15 epochs (1 of linear warm-up, then cosine),
# AdamW 1e-3, batch 32, EMA 0.995, bf16 autocast on the CPU, the augmentation as it was
# before the DICOM-look steps (their probabilities 0). Only the backbone and its start
# differ. lite0-dicom then adds the exposed-field crop and the DICOM-look augmentation
# at its defaults. Each is scored on the validation part and compared, paired, with the
# shipped models (compare.py). `runs.sh cv NAME FOLD...` runs a recipe's 5-fold
# cross-validation (resumable fold by fold, each fold's scores kept in cv-NAME/) and
# `fractured cv --merge` over the five. The test part is not read.
set -euo pipefail
cd "$(dirname "$0")/../../.."
common=(--task classifier --epochs 15
        --set classifier.input_size=256 --set classifier.warmup_epochs=1
        --set classifier.ema_decay=0.995 --set classifier.early_stopping=6
        --set run.cpu_bf16=true)
jpeg_only=()
for step in gamma_p window_p bits_p jpeg_p sharpness_p border_p; do
  jpeg_only+=(--set "augment.$step=0")
done
lite0=(--set 'classifier.variant="lite0"'
       --set 'classifier.initial_weights="imagenet:efficientnet-lite0"')
run() {  # NAME, then extra settings
  local out="runs/$1"; shift
  mkdir -p "$out/split"
  cp docs/training/fracatlas-resnet18-e50/split.{csv,json} "$out/split/"
  .venv/bin/fractured train ../shared/data/fracatlas --out "$out" "${common[@]}" "$@"
  .venv/bin/fractured evaluate "$out" --split val
  .venv/bin/python docs/training/fracatlas-lite0-256/compare.py "$out/eval-val/predictions.csv"
}
recipe() {  # NAME: that recipe's settings, one per line
  case "$1" in
    lite0) printf '%s\n' "${jpeg_only[@]}" "${lite0[@]}" ;;
    resnet18) printf '%s\n' "${jpeg_only[@]}" --set 'classifier.variant="resnet18"' ;;
    lite0-dicom) printf '%s\n' "${lite0[@]}" --set 'data.crop="exposed_field"' ;;
    *) echo "no recipe $1" >&2; exit 2 ;;
  esac
}
folds() {  # NAME FOLD...: 5-fold cross-validation runs over the base split's train+val
  # (its test part untouched), each resumed where a session ended and skipped once done.
  # Each fold is scored as soon as it is trained, into docs/.../cv-NAME/fold-F (kept in
  # the repository: a run directory does not outlive its machine); the five reports are
  # merged into cv-NAME/ once all exist, whichever machines trained them.
  local name="$1"; shift
  local reports="docs/training/fracatlas-lite0-256/cv-$name"
  mapfile -t settings < <(recipe "$name")
  for f in "$@"; do
    local out="runs/$name-f$f" resume=()
    [ -f "$reports/fold-$f/cv.json" ] && continue
    if [ ! -f "$out/done" ]; then
      if [ -f "$out/classifier/last.pt" ]; then resume=(--resume)
      else rm -rf "$out"  # stopped before its first epoch: nothing to resume, start again
      fi
      .venv/bin/fractured train ../shared/data/fracatlas --out "$out" "${common[@]}" \
        "${resume[@]}" --set data.folds=5 --set "data.fold=$f" \
        --set data.base_split=docs/training/fracatlas-resnet18-e50 "${settings[@]}"
      touch "$out/done"
    fi
    .venv/bin/fractured cv "$out" --out "$reports/fold-$f"
  done
  if [ "$(ls "$reports"/fold-?/cv.json 2>/dev/null | wc -l)" -eq 5 ]; then
    local merge=()
    for f in 0 1 2 3 4; do merge+=(--merge "$reports/fold-$f"); done
    .venv/bin/fractured cv "${merge[@]}" --out "$reports"
  fi
}
case "${1:-all}" in
  lite0|resnet18|lite0-dicom)
    mapfile -t settings < <(recipe "$1")
    run "$1-256-e15" "${settings[@]}" ;;
  cv) shift; folds "$@" ;;  # e.g. runs.sh cv lite0-dicom 0 1 2 3 4
  cv-both)  # the two candidates' folds interleaved, so a session's worth compares
    for f in 0 1 2 3 4; do "$0" cv lite0-dicom "$f"; "$0" cv lite0 "$f"; done ;;
  all) "$0" lite0; "$0" resnet18; "$0" lite0-dicom ;;
esac
