#!/bin/bash
# QAT recipes x seeds on the offline GPU machine (bench/README.md, "Accuracy"), in calls of at most 600 s:
#
#   bash bench/gpu_sweep.sh train   # GPU: each seed's twin + default QAT run, then every recipe's QAT run
#   bash bench/gpu_sweep.sh eval    # the machine's CPU: the default runs (their BF16/PTQ rows are what every
#                                   # --twin run reuses), then the recipes' QAT runs
#   python bench/seed_pool.py runs/sweep/results/accuracy-*-<name>-s{42,1,2}.json   # per recipe, here
#
# Resumable: a trained run is not trained again, an evaluated one (its results file exists) not evaluated again,
# so a call cut at its time limit is continued by the next. Train on the GPU, evaluate on the CPU: the int8-int4
# eager model on CUDA is slower than on 5 CPU threads (docs/accuracy.md). Runs, logs and a copy of each results file
# live under runs/sweep/ (ignored paths survive between calls on a warm machine; untracked files do not).
# Settings (environment): SEEDS ("42 1 2"), RECIPES ("name:args;...", empty: the default runs only), P (parallel
# jobs, default 6), EVAL_THREADS (torch threads per evaluation, default 2), LIMIT (questions, default 200).
set -u
SEEDS=${SEEDS:-"42 1 2"}
RECIPES=${RECIPES-"s360:--qat-max-steps 360;lr3:--recipe lr3;slr1:--recipe learned-lr1;mixed:--recipe learned-mixed"}
P=${P:-6}
export EVAL_THREADS=${EVAL_THREADS:-2} LIMIT=${LIMIT:-200} OMP_NUM_THREADS=${EVAL_THREADS:-2}
W=runs/sweep
mkdir -p "$W/logs" "$W/results"

step() {  # step train|eval NAME ARGS...
  local what=$1 name=$2
  shift 2
  local run="$W/$name" log="$W/logs/$name-$what.log"
  if [ "$what" = train ]; then
    [ -f "$run/converted/scheme.json" ] && { echo "trained: $name"; return 0; }
    python3 bench/accuracy.py --run "$run" --no-eval "$@" > "$log" 2>&1
  else
    ls "$W/results/"accuracy-*-"$name".json > /dev/null 2>&1 && { echo "evaluated: $name"; return 0; }
    [ -f "$run/converted/scheme.json" ] || { echo "not trained: $name"; return 1; }
    python3 bench/accuracy.py --run "$run" --no-train "$@" --runtimes eager --limit "$LIMIT" --no-agreement \
      --threads "$EVAL_THREADS" --tag "$name" > "$log" 2>&1 && cp bench/results/accuracy-*-"$name".json "$W/results/"
  fi
  echo "$what $name rc=$? $(tail -n 1 "$log" | cut -c1-120)"
}
export -f step
export W

jobs_for() {  # the recipe jobs, one line each: NAME ARGS...
  local s r
  for s in $SEEDS; do
    IFS=';' read -ra rs <<< "$RECIPES"
    for r in "${rs[@]}"; do echo "${r%%:*}-s$s --twin $W/def-s$s --seed $s ${r#*:}"; done
  done
}

case "${1:-}" in
  train)
    python3 -c "from edgeft.models import resolve_model; resolve_model('smollm2-135m')" || exit 1  # once, not racing
    for s in $SEEDS; do step train "def-s$s" --seed "$s" & done
    wait
    jobs_for | xargs -r -P "$P" -L 1 bash -c 'step train "$@"' _
    ;;
  eval)
    for s in $SEEDS; do step eval "def-s$s" --seed "$s" & done
    wait
    jobs_for | xargs -r -P "$P" -L 1 bash -c 'step eval "$@"' _
    ;;
  *)
    echo "usage: bash bench/gpu_sweep.sh train|eval" >&2
    exit 2
    ;;
esac
