#!/usr/bin/env bash
# The bundles issue 26 ships, made from the lite0-dicom recipe's run on the base split
# (`../fracatlas-lite0-256/runs.sh lite0-dicom`, runs/lite0-dicom-256-e15) and 0.7.0's
# detector, which was trained on the same split (../fracatlas-lite0-256/NOTES.md says why
# not a fold's model).
#   ship.sh candidate  the run's records, the float bundle fractured-0.9.0, its DICOM
#                      check on the test part's images (agreement between two readings
#                      of each image: no label is read, so no look at the test part) and
#                      the fusion decision on validation (fusion_val.py)
#   ship.sh fused      if fusion_val.py said fuse: fractured-0.10.0, the probability
#                      fused; scores the test part (a look: the test ledger's next row)
#   ship.sh int8 SRC LOOKS
#                      the INT8 form of SRC (0.9.0 or 0.10.0) as fractured-0.11.0: the
#                      detector's convolutions in INT8, the classifier's kept in float32
#                      (all in INT8 lost 0.009 of validation AUC, over the 0.005 allowed:
#                      NOTES.md), scored
#                      on the test part beside SRC (a look; LOOKS is the ledger's count
#                      before it) with WHAT-WAS-TRIED.md in its card, and raced against
#                      0.8.1 in bench/engine.py
#   ship.sh region-check LOOKS
#                      issue 27: 0.10.0 with its region check fitted again, the threshold
#                      by cross-validation over train+val (fractured-0.10.1), then its
#                      INT8 form as fractured-0.11.1 (the graphs those of 0.11.0), scored
#                      on the test part (a look: LOOKS as for int8)
#   ship.sh region-check-99 LOOKS
#                      0.10.1's check fitted again with the floor at 99 % (what makes a
#                      held-out part of 480 images show 98 %), from the classifier's
#                      split as its run directory is gone (fractured-0.10.2), then its
#                      INT8 form as fractured-0.11.2, scored on the test part (a look)
# The cross-validation has to have said the recipe beats 0.8.1 before `fused` or `int8`.
set -euo pipefail
cd "$(dirname "$0")/../../.."
here=docs/training/fracatlas-lite0-dicom
run=runs/lite0-dicom-256-e15
split=docs/training/fracatlas-resnet18-e50
case "${1:-}" in
  candidate)
    [ -f "$run/classifier/best.pt" ] && [ -d "$run/eval-val" ] \
      || { echo "$run has not finished (runs.sh lite0-dicom)" >&2; exit 2; }
    cp "$run/train.toml" "$here/train.toml"
    cp "$run/classifier/history.csv" "$here/history.csv"
    rm -rf "$here/val" && cp -r "$run/eval-val" "$here/val"
    .venv/bin/fractured build-engine "$run" --detector-bundle engines/fractured-0.7.0 \
      --float16-weights --out engines/fractured-0.9.0 --version 0.9.0
    .venv/bin/fractured check-dicom engines/fractured-0.9.0 --split "$split" \
      --part test --out "$here/dicom-check"
    .venv/bin/python "$here/fusion_val.py" engines/fractured-0.9.0 \
      | tee "$here/fusion-val.txt" ;;
  fused)
    .venv/bin/fractured fuse engines/fractured-0.9.0 --split "$split" \
      --out engines/fractured-0.10.0 --version 0.10.0 --report "$here/fused" \
      --subset hardware=0 --dicom-check "$here/dicom-check/dicom-check.json" \
      --test-looks 19 ;;
  int8)
    source="${2:?int8 needs the source bundle}" looks="${3:?int8 needs the count of earlier test looks}"
    .venv/bin/fractured quantize "engines/$source" --split "$split" \
      --out engines/fractured-0.11.0 --version 0.11.0 --report "$here/test" \
      --subset hardware=0 --dicom-check "$here/dicom-check/dicom-check.json" \
      --test-looks "$looks" --notes docs/training/WHAT-WAS-TRIED.md \
      --keep-float onnx::Conv_ --keep-float attention --keep-float head
    .venv/bin/python -m bench.engine --variants none --detectors none \
      --bundle engines/fractured-0.11.0 \
      --peer-bundle engines/fractured-0.8.1 | tee "$here/bench-engine.txt" ;;
  region-check)
    looks="${2:?region-check needs the count of earlier test looks}"
    .venv/bin/fractured region-check engines/fractured-0.10.0 --out engines/fractured-0.10.1 \
      --version 0.10.1 --float16-weights
    .venv/bin/fractured quantize engines/fractured-0.10.1 --split "$split" \
      --out engines/fractured-0.11.1 --version 0.11.1 --report "$here/test-0.11.1" \
      --subset hardware=0 --dicom-check "$here/dicom-check/dicom-check.json" \
      --test-looks "$looks" --notes docs/training/WHAT-WAS-TRIED.md \
      --keep-float onnx::Conv_ --keep-float attention --keep-float head ;;
  region-check-99)
    looks="${2:?region-check-99 needs the count of earlier test looks}"
    .venv/bin/fractured region-check engines/fractured-0.10.1 --out engines/fractured-0.10.2 \
      --version 0.10.2 --split "$split" --float16-weights
    .venv/bin/fractured quantize engines/fractured-0.10.2 --split "$split" \
      --out engines/fractured-0.11.2 --version 0.11.2 --report "$here/test-0.11.2" \
      --subset hardware=0 --dicom-check "$here/dicom-check/dicom-check.json" \
      --test-looks "$looks" --notes docs/training/WHAT-WAS-TRIED.md \
      --keep-float onnx::Conv_ --keep-float attention --keep-float head ;;
  *) echo "usage: ship.sh candidate | fused | int8 SOURCE LOOKS | region-check LOOKS |" \
          "region-check-99 LOOKS" >&2
     exit 2 ;;
esac
