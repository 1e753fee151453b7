#!/bin/bash
# Train a ControlNet on several nodes of 8 GPUs each (default 2 nodes = 16 GPUs): one task per GPU,
# started by srun on every node; Lightning reads the ranks and the main node from SLURM. The
# logical batch of the experiment is kept: accumulation = 256 / (batch x 8 x nodes); choose
# nodes so that it divides (batch 16: 1 or 2 nodes; data.batch_size=8 for 4 nodes, 4 for 8).
#
# What to edit:
#   * the #SBATCH lines below (partition, account, time limit, CPUs) for your cluster;
#   * the environment setup (module load / conda activate / venv) in "Environment";
#   * SD15_PATH (or SD21_PATH with model=sd21) and the shard location, here or on the command line.
# How to submit (anything after the script name is a Hydra override of the train command):
#   export SD15_PATH=/models/stable-diffusion-v1-5
#   sbatch slurm/train_multinode.sh +experiment=canny "data.train_shards='/data/canny/data-{000000..000999}.tar'"
#   sbatch slurm/train_multinode.sh +experiment=depth strategy=deepspeed_stage_2 data.train_shards=/data/depth
# Dry run (prints the resolved srun command, launches nothing; works on a login node):
#   CN_DRY_RUN=1 bash slurm/train_multinode.sh +experiment=canny "data.train_shards='/data/canny/data-{000000..000999}.tar'"
# Quote brace patterns for Hydra as above (outer double quotes, inner single quotes); a folder
# with manifest.json (data.train_shards=/data/canny) needs no quotes.
# Where outputs go: ${CN_RUNS:-$SLURM_SUBMIT_DIR/outputs}/<job name>/<job id>/
#   checkpoints/ (last.ckpt, step_*.ckpt), hpc_ckpt_N.ckpt (written on requeue), controlnet/
#   (diffusers export at the end), samples/, wandb/, train.log; SLURM's log: slurm-<name>-<id>.out.
# Preemption / time limit: SLURM sends SIGUSR1 90 s before the end (--signal); Lightning saves
#   hpc_ckpt_N.ckpt and requeues the job (auto-requeue). The requeued job keeps its id, so it finds
#   the same run directory, resumes from the newest checkpoint (resume=auto) and continues the same
#   W&B run (++logger.wandb.run_id=cn-<job id>; ignored without the wandb logger).
#SBATCH --job-name=cn_train_mn
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

# ---- Environment (edit) -------------------------------------------------------------------
# module load cuda/12.4
# source /path/to/cn_lightning/.venv/bin/activate
PYTHON=${PYTHON:-python}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# Multi-node networking (uncomment what your cluster needs):
# export NCCL_SOCKET_IFNAME=ib0
# export NCCL_IB_HCA=mlx5

# ---- Helpers (do not edit) ---------------------------------------------------------------
# Print a command so that pasting it into a shell runs exactly it: plain words as they are,
# others in single quotes, or in double quotes when they hold a single quote (a Hydra override
# such as "data.train_shards='/data/x-{000000..000099}.tar'" prints as it is written).
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

# ---- Derived from the job (do not edit) ----------------------------------------------------
JOB_ID=${SLURM_JOB_ID:-<job_id>}
JOB_NAME=${SLURM_JOB_NAME:-cn_train_mn}
NODES=${SLURM_NNODES:-2}
GPUS_PER_NODE=${SLURM_NTASKS_PER_NODE:-8}
RUNS=${CN_RUNS:-${SLURM_SUBMIT_DIR:-$PWD}/outputs}
RUN_DIR=$RUNS/$JOB_NAME/$JOB_ID

CMD=(srun --kill-on-bad-exit=1 "$PYTHON" -m cn_lightning.train
  "hydra.run.dir=$RUN_DIR"
  "trainer.devices=$GPUS_PER_NODE"
  "trainer.num_nodes=$NODES"
  "++logger.wandb.run_id=cn-$JOB_ID"
  "$@")

if [[ -n "${CN_DRY_RUN:-}" ]]; then
  print_command "${CMD[@]}"
  exit 0
fi
mkdir -p "$RUN_DIR"
echo "[slurm] job $JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) -> $RUN_DIR"
exec "${CMD[@]}"
