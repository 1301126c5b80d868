#!/usr/bin/env bash
# GPU ladder, stage 5 -- the trainer at the papers' protocol (issue 27): one CIFAR-10-sized epoch of
# ResNet-20 (pad-4 crop + flip) through ntkfast.training.train, float32 and bf16 + channels-last,
# against a DataLoader loop with per-image host augmentation; K=8 masked ResNet-20s through
# train_grouped against 8 train runs one after another. Synthetic images (no dataset travels).
# The issue's targets: 160 epochs in <= 2 minutes (<= 0.75 s an epoch); K=8 in <= 2x one network.
#   bash benchmarks/gpu/stage5.sh [--dry-run]
source "$(dirname "$0")/lib.sh"
stage_begin 5 "$@"
ensure_build
bench_begin
bench fast_train 240 bench_fast_train
bench_end
stage_end; exit $?
