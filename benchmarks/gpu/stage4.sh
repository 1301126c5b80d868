#!/usr/bin/env bash
# GPU ladder, stage 4 -- method benchmarks, each against its peer on the same GPU: NTK-SAP (ResNet-20
# full prune at the authors' settings, one VGG-16 / CIFAR-100 round) against the authors'-way loop;
# the empirical NTK (LeNet-300-100 full N=256, ResNet-20 trace N=64, ResNet-18 224x224 K=1000 N=1
# full) against torch.func; the NTT step (LeNet-300-100, LeNet-5, ResNet-20); tr Pi of VGG-16 and
# 100 rounds of SynFlow-L2; one training epoch. TF32 off; peak memory in-process.
#   bash benchmarks/gpu/stage4.sh [--dry-run]
source "$(dirname "$0")/lib.sh"
stage_begin 4 "$@"
ensure_build
bench_begin
if [ "$DRY_RUN" = 1 ]; then
  # --quick renames the cases (smaller N, rounds, steps) and drops the large models
  NTKSAP_CASES=(--case resnet20-prune --case vgg16-c10-round)
  NTK_CASES=(--case lenet300_100-full-N16 --case resnet20-trace-N4)
  PATH_CASES=(--case trace-resnet20 --case synflow_l2-resnet20-r5)
  TRAIN_CASES=(--case lenet5-B16-3steps)
else
  NTKSAP_CASES=(--case resnet20-prune --case vgg16-c100-round)
  NTK_CASES=(--case lenet300_100-full-N256 --case resnet20-trace-N64 --case resnet18-full-N1)
  PATH_CASES=(--case trace-vgg16 --case synflow_l2-vgg16-r100)
  TRAIN_CASES=(--case resnet20-B128-epoch)
fi
bench ntksap 70 bench_ntksap "${NTKSAP_CASES[@]}"
bench ntk 60 bench_ntk --no-beyond "${NTK_CASES[@]}"
bench ntt 40 bench_ntt
bench pathkernel 50 bench_pathkernel "${PATH_CASES[@]}"
bench train 50 bench_train "${TRAIN_CASES[@]}"
bench_end
stage_end; exit $?
