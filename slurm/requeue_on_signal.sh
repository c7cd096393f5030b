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

# The training command line from the documented variables (see the templates' headers), into the array
# `arguments`. A variable holding a newline is refused (status 2): GAN_ARGS is split at blanks on one line, so
# whatever followed a newline would be dropped without a word, and in GAN_RUN_DIR it would become an override.
training_arguments() {
    local name
    for name in GAN_CONFIG GAN_RUN_DIR GAN_WANDB GAN_ARGS; do
        if [[ ${!name:-} == *$'\n'* ]]; then
            echo "error: $name holds a newline; give it on one line (GAN_ARGS: key=value overrides separated by" \
                "spaces)" >&2
            return 2
        fi
    done
    arguments=(--config "${GAN_CONFIG:-configs/default.yaml}")
    if [[ -n ${GAN_RUN_DIR:-} ]]; then arguments+=("run.dir=$GAN_RUN_DIR"); fi
    if [[ -n ${GAN_WANDB:-} ]]; then arguments+=("logging.wandb=$GAN_WANDB"); fi
    local -a extra=()
    read -r -a extra <<< "${GAN_ARGS:-}"
    arguments+=("${extra[@]}")
}
