# Sourced by every slurm/*.sbatch script (SLURM copies a batch script before running it, so the repository is
# found through SLURM_SUBMIT_DIR: submit from the repository root, as slurm/pipeline.py does).
#  - sets up .venv from the lock (idempotent; array tasks starting together take turns)
#  - preemption: the scripts ask for SIGUSR1 before the time limit (--signal=USR1@180) and --requeue. The training
#    stages then checkpoint at the next step boundary and exit (data_gen between shards); the Python side leaves
#    $DRAFTSMITH_PREEMPT_MARK, and `finish` requeues the job, which resumes from that checkpoint (resume=auto).
#  - DRAFTSMITH_ENV=vllm (data_gen=vllm; slurm/pipeline.py sets it) uses .venv-vllm, vLLM's own environment
cd "${SLURM_SUBMIT_DIR:?run this script through sbatch, from the repository root}"
if [ "${DRAFTSMITH_ENV:-}" = vllm ]; then
  flock .ci/.setup.lock .ci/setup-vllm || { echo "[draftsmith] error: .ci/setup-vllm failed" >&2; exit 1; }
  python=.venv-vllm/bin/python
else
  flock .ci/.setup.lock .ci/setup || { echo "[draftsmith] error: .ci/setup failed" >&2; exit 1; }
  python=.venv/bin/python
fi
export DRAFTSMITH_PREEMPT_MARK="${TMPDIR:-/tmp}/draftsmith-preempted-${SLURM_JOB_ID}"
rm -f "$DRAFTSMITH_PREEMPT_MARK"
echo "[draftsmith] job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) on ${SLURM_JOB_NODELIST:-?}, start $((${SLURM_RESTART_COUNT:-0} + 1)), $(date -Is)"

finish() {  # finish STATUS: requeue after a checkpointed stop, else end with the step's exit status
  if [ -f "$DRAFTSMITH_PREEMPT_MARK" ]; then
    echo "[draftsmith] job ${SLURM_JOB_ID}: $(cat "$DRAFTSMITH_PREEMPT_MARK"); requeueing it"
    rm -f "$DRAFTSMITH_PREEMPT_MARK"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  if [ "$1" -ne 0 ]; then
    echo "[draftsmith] job ${SLURM_JOB_ID} failed with exit status $1" >&2
  fi
  exit "$1"
}
