#!/bin/bash
# Build a million-sample shard set across nodes: one SLURM array task per part.
# Each task builds shards i with i % SLURM_ARRAY_TASK_COUNT == task index (data_prep reads the
# SLURM_ARRAY_* variables); reruns skip finished shards, and the last task to finish writes the
# complete manifest.json. Check the result with: python -m data_prep.inspect_shards "$OUT"
#
# How to submit (settings are environment variables, exported by sbatch to the job):
#   SRC=/data/laion_subset OUT=/data/shards/laion_canny sbatch slurm/prep_shards_array.sh
#   TOOL=ade20k SRC=/data/ADEChallengeData2016 OUT=/data/shards/ade20k \
#     sbatch --array=0-3 slurm/prep_shards_array.sh
#   A model-based condition (hed, depth, openpose, ...; docs/data.md) on one GPU per task, a few
#   workers sharing it:
#   CONDITION=depth WEIGHTS=/models/depth-anything-v2-small SRC=/data/photos \
#     OUT=/data/shards/depth EXTRA_ARGS="--device cuda --batch-size 32" \
#     sbatch --gres=gpu:1 --cpus-per-task=4 slurm/prep_shards_array.sh
#   TOOL, SRC, OUT, CONDITION (canny), WEIGHTS (the extractor's local weights), RESOLUTION
#   (512), SAMPLES_PER_SHARD (1000), EXTRA_ARGS (more data_prep flags, split on spaces),
#   PYTHON (python).
# Dry run (prints the command each array task runs, creates and launches nothing):
#   CN_DRY_RUN=1 SRC=/data/laion_subset OUT=/data/shards/laion_canny bash slurm/prep_shards_array.sh
# Where outputs go: OUT/<prefix>-NNNNNN.tar + OUT/manifest.json; SLURM's log of each array task:
#   slurm-cn-prep-shards-<array job id>_<task index>.out in the submit directory.
#
#SBATCH --job-name=cn-prep-shards
#SBATCH --array=0-15
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=32G
#SBATCH --time=08:00:00
#SBATCH --output=slurm-%x-%A_%a.out
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
PYTHON=${PYTHON:-python}

# ---- Helpers (do not edit) ---------------------------------------------------------------
# Print a command so that pasting it into a shell runs exactly it: plain words as they are,
# others in single quotes, or in double quotes when they hold a single quote.
print_command() {
  local words=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=+,@%-]+$ ]]; then
      words+=("$a")
    elif [[ $a != *\'* ]]; then
      words+=("'$a'")
    elif [[ $a != *[\"\$\`\\!]* ]]; then
      words+=("\"$a\"")
    else
      words+=("$(printf '%q' "$a")")
    fi
  done
  printf '%s\n' "${words[*]}"
}

args=(--out "$OUT" --resolution "$RESOLUTION"
      --samples-per-shard "$SAMPLES_PER_SHARD" --workers "${SLURM_CPUS_PER_TASK:-8}")
if [[ "$TOOL" != synthetic_circles ]]; then
  args+=(--src "$SRC")
fi
if [[ "$TOOL" == from_images ]]; then
  args+=(--condition "$CONDITION")
  if [[ -n "${WEIGHTS:-}" ]]; then
    args+=(--weights "$WEIGHTS")
  fi
fi
read -r -a extra <<< "$EXTRA_ARGS"      # split on spaces, no glob expansion
CMD=(srun "$PYTHON" -m "data_prep.$TOOL" "${args[@]}" ${extra[@]+"${extra[@]}"})

if [[ -n "${CN_DRY_RUN:-}" ]]; then
  # data_prep takes its part of the shards from SLURM_ARRAY_TASK_ID / _COUNT in each task.
  print_command "${CMD[@]}"
  exit 0
fi
mkdir -p "$OUT"
exec "${CMD[@]}"
