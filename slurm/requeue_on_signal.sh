# shellcheck shell=bash
# Sourced by the sbatch templates. `run_requeueable CMD...` runs CMD in the background and waits.
# On SIGUSR1 (Slurm's `--signal=B:USR1@120` warning before the time limit, or a preemption) or
# SIGTERM it passes SIGTERM on to CMD (to every process of the job steps when CMD is srun), waits
# until CMD has exited (python -m train.launch returns only when every training process has, so
# the checkpoint is on disk), then requeues the job.
# `scontrol requeue` ends this script, so everything is written before it.

requeue_signal=""

forward_to_training() {
    requeue_signal=$1
    echo "[$(date -Is)] $1 received: asking the training to checkpoint and stop" >&2
    if [[ $training_runs_under_srun == 1 ]]; then
        # srun answers SIGTERM by ending the step at once; Slurm signals the steps' processes instead.
        scancel --signal=TERM "$SLURM_JOB_ID"
    else
        kill -TERM "$training_pid" 2>/dev/null || true
    fi
}

run_requeueable() {
    training_runs_under_srun=0
    [[ $1 == srun ]] && training_runs_under_srun=1
    trap 'forward_to_training USR1' USR1
    trap 'forward_to_training TERM' TERM
    "$@" &
    training_pid=$!
    local status=0
    # `wait` returns early when a trapped signal arrives; wait again until the training is gone.
    while true; do
        wait "$training_pid" && status=0 || status=$?
        kill -0 "$training_pid" 2>/dev/null || break
    done
    if [[ -n $requeue_signal ]]; then
        echo "[$(date -Is)] training stopped (exit $status) after $requeue_signal; requeueing job $SLURM_JOB_ID" >&2
        scontrol requeue "$SLURM_JOB_ID" || echo "requeue refused: resubmit this script to resume" >&2
    fi
    return "$status"
}

# The training command line from the documented variables (see the templates' headers).
training_arguments() {
    local -a arguments=(--config "${GAN_CONFIG:-configs/default.yaml}")
    [[ -n ${GAN_RUN_DIR:-} ]] && arguments+=("run.dir=$GAN_RUN_DIR")
    [[ -n ${GAN_WANDB:-} ]] && arguments+=("logging.wandb=$GAN_WANDB")
    local -a extra=()
    read -r -a extra <<< "${GAN_ARGS:-}"
    printf '%s\n' "${arguments[@]}" "${extra[@]}"
}
