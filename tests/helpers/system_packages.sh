#!/usr/bin/env bash
# The system programs some tests need: Debian's Slurm 22.05 with munge (tests/test_slurm.py) and the
# linter of the shell scripts (tests/test_launch.py). `make test` runs this every time: it installs whatever is
# missing with apt-get when it runs as root, and otherwise says what to install; those tests then
# skip, unless GAN_REQUIRE_SYSTEM_TOOLS=1 (set by .ci/run) makes a missing program a failure.
set -euo pipefail
declare -A package_of=([slurmctld]=slurmctld [slurmd]=slurmd [sbatch]=slurm-client [munged]=munge
                       [shellcheck]=shellcheck)
missing=()
for program in "${!package_of[@]}"; do
    command -v "$program" >/dev/null || missing+=("${package_of[$program]}")
done
(( ${#missing[@]} )) || exit 0
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "note: missing ${missing[*]}; install them (Debian: apt-get install ${missing[*]}) to run the Slurm" \
         "and shellcheck tests" >&2
    exit 0
fi
echo "installing ${missing[*]} with apt-get" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
