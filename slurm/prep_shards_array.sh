#!/bin/bash
# Build a million-sample shard set across nodes: one SLURM array task per part.
# Each task builds shards i with i % SLURM_ARRAY_TASK_COUNT == task index (data_prep reads the
# SLURM_ARRAY_* variables); reruns skip finished shards, and the last task to finish writes the
# complete manifest.json. Check the result with: python -m data_prep.inspect "$OUT"
#
#   SRC=/data/laion_subset OUT=/data/shards/laion_canny sbatch slurm/prep_shards_array.sh
#   TOOL=ade20k SRC=/data/ADEChallengeData2016 OUT=/data/shards/ade20k sbatch --array=0-3 ...
#
#SBATCH --job-name=cn-prep-shards
#SBATCH --array=0-15
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=32G
#SBATCH --time=08:00:00
#SBATCH --output=logs/prep_%A_%a.out
set -euo pipefail

: "${OUT:?set OUT to the output folder}"
TOOL=${TOOL:-from_images}                  # from_images | fill50k | ade20k | synthetic_circles
if [[ "$TOOL" != synthetic_circles ]]; then
  : "${SRC:?set SRC to the input (folder, metadata.jsonl folder or shard pattern)}"
fi
CONDITION=${CONDITION:-canny}
RESOLUTION=${RESOLUTION:-512}
SAMPLES_PER_SHARD=${SAMPLES_PER_SHARD:-1000}
EXTRA_ARGS=${EXTRA_ARGS:-}

mkdir -p logs "$OUT"
args=(--out "$OUT" --resolution "$RESOLUTION"
      --samples-per-shard "$SAMPLES_PER_SHARD" --workers "${SLURM_CPUS_PER_TASK:-8}")
if [[ "$TOOL" != synthetic_circles ]]; then
  args+=(--src "$SRC")
fi
if [[ "$TOOL" == from_images ]]; then
  args+=(--condition "$CONDITION")
fi
# shellcheck disable=SC2086
srun python -m "data_prep.$TOOL" "${args[@]}" $EXTRA_ARGS
