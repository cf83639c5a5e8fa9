#!/usr/bin/env bash
# The full method comparison of docs/results.md: every (setting, method) of configs/paper/ as its own
# process, in parallel (each is exactly `hierfedlora compare CONFIG --methods METHOD`), then one
# report per setting. Meant for a machine with a GPU and many cores; on a 2-core CPU run the settings
# one at a time with `hierfedlora compare` instead (hours).
#   usage: scripts/paper.sh OUT_DIR [SETTING ...]   (SETTING = a configs/paper/*.toml stem; default all)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/paper}; shift || true
settings=("$@")
[ ${#settings[@]} -gt 0 ] || settings=(rotten_tomatoes-alpha0.1 rotten_tomatoes-alpha1.0 health_tweets-alpha0.1 health_tweets-alpha1.0)
methods=${METHODS:-fedlora,hetlora,flexlora,legend,hierfedlora}
ablations=${ABLATIONS:-hfl-fixed-depth,hfl-fixed-tau,hfl-random-groups}
ablation_setting=${ABLATION_SETTING:-rotten_tomatoes-alpha0.1}
py=${PYTHON:-python3}
for s in "${settings[@]}"; do
  list=$methods
  [ "$s" = "$ablation_setting" ] && list="$methods,$ablations"
  for m in ${list//,/ }; do
    mkdir -p "$out/$s"
    $py -m hierfedlora.cli compare "configs/paper/$s.toml" --methods "$m" --out "$out/$s" --quiet \
      > "$out/$s/$m.log" 2>&1 &
  done
done
wait
for s in "${settings[@]}"; do
  $py -m hierfedlora.cli report "$out/$s" > /dev/null 2>&1 || echo "report for $s failed"
done
