#!/usr/bin/env bash
# GPU ladder, stage 6 -- 2:4 masks the GPU runs faster (issue 28): the semi-structured conversion's
# CUDA test (the copy computes what the masked model computes, float16 and bfloat16), then the
# forward pass and a training step's passes of a ViT-B/16 and a GPT-2-small-shaped decoder with
# their block Linear weights 2:4 and semi-structured, against the same masks kept dense.
# The issue's target: >= 1.3x dense forward speed.
#   bash benchmarks/gpu/stage6.sh [--dry-run]
source "$(dirname "$0")/lib.sh"
stage_begin 6 "$@"
ensure_build
pytest_step semi-structured 60 tests/test_semi_structured.py
bench_begin
bench semi_structured 180 bench_semi_structured
bench_end
stage_end; exit $?
