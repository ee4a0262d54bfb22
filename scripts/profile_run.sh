#!/usr/bin/env bash
# Run the whole pipeline under a profile and keep its metrics in results/<name>/, where
# `python -m persona results` turns them into README's second table.
#
#   scripts/profile_run.sh PROFILE [NAME]      e.g. scripts/profile_run.sh cpu-spc
#
# The run happens in a git worktree of HEAD beside this checkout (../<repo>-run-<root>, <root> the profile at the
# top of its `extends` chain): the committed code, so the results belong to a commit, and this checkout's
# params.yaml, models and DVC outputs stay as they are. Beside it, a data.source relative to params.yaml (cpu-spc's
# ../shared/...) names the same folder as here. A second call, or a profile that extends this one (cpu-spc-grpo),
# reuses the worktree, moved to the new HEAD with the run's dvc.lock, metrics and curves kept: DVC reruns only the
# stages whose code, params or inputs changed, and a killed stage resumes.
set -euo pipefail
profile=${1:?usage: scripts/profile_run.sh PROFILE [NAME]}
name=${2:-$profile}
repo=$(git rev-parse --show-toplevel)
python=${PYTHON:-$repo/.venv/bin/python}
root=$(cd "$repo" && "$python" -c 'import sys; from persona.profiles import root; print(root(sys.argv[1]))' "$profile")
work="$(dirname "$repo")/$(basename "$repo")-run-$root"

if [ -d "$work" ]; then
  # git tracks dvc.lock, metrics/ and dvclive/ (the default run's): a bare checkout would put those back, and DVC
  # would then see every stage's outputs changed and rerun the whole pipeline. Emptied before the kept copy
  # returns: a default-run file this run does not write (the trained reward's curves) would change a folder's hash
  kept=$(mktemp)
  tar -C "$work" -cf "$kept" dvc.lock metrics dvclive
  git -C "$work" checkout --quiet --force --detach "$(git -C "$repo" rev-parse HEAD)"
  rm -rf "${work:?}/dvc.lock" "$work/metrics" "$work/dvclive"
  tar -C "$work" -xf "$kept" && rm "$kept"
else
  git -C "$repo" worktree add --quiet --detach "$work" HEAD
fi
cd "$work"
"$python" -m persona profile "$profile"
started=$(date +%s)
log=$(mktemp)
PATH="$(dirname "$python"):$PATH" dvc repro 2>&1 | tee "$log"
wall=$(( $(date +%s) - started ))
# a reused worktree reruns only what changed: run.json names the stages its repro_wall_s covers (every stage's
# own time is in its metrics)
stages=$({ grep -ao "Running stage '[^']*'" "$log" || true; } | sed "s/Running stage '\(.*\)'/\"\1\"/" | paste -sd, - | sed 's/,/, /g')
rm "$log"

out="$repo/results/$name"
rm -rf "$out" && mkdir -p "$out"
cp metrics/*.json metrics/report.md metrics/*.png params.yaml "$out/"
printf '{\n  "profile": "%s",\n  "commit": "%s",\n  "repro_wall_s": %s,\n  "stages_run": [%s]\n}\n' \
  "$profile" "$(git rev-parse HEAD)" "$wall" "$stages" > "$out/run.json"
echo "results/$name: metrics of profile $profile at $(git rev-parse --short HEAD), dvc repro ${wall}s"
