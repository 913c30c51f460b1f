#!/usr/bin/env bash
# One call of the study on a GPU machine, within SECONDS: pretrain the new families (studies/pretrain.py; kept
# if already there), sweep WORKLOADS, then the full-finetuning proxies of PROXIES, export whatever the run
# folders hold, and pack the results, the run folders and the logs into $OUT/study.tar.gz. Run from the folder
# that holds studies/ and mua_cli/ (a carried copy of the repository):
#
#   bash studies/device_call.sh SECONDS WORKLOADS [PROXIES]        # names joined by ',' (or 'all'), '' for none
#
# Everything lives under $BASE (default /tmp/study, outside the carried tree, so a second call on a machine
# still warm finds the models and run folders of the first); on a fresh machine RESUME=study.tar.gz (an
# earlier call's) restores the run folders first, and the models are pretrained again. Stored trials are
# skipped. SMOKE=1: the tiny settings, for a CPU check of this script.
set -u
secs=$1 work=$2 proxies=${3:-}
start=$(date +%s)
B=${BASE:-/tmp/study} smoke=${SMOKE:+--smoke}
M=$B/models R=$B/runs S=$B/results L=$B/logs
if [ -n "${RESUME:-}" ] && [ ! -d "$R" ]; then mkdir -p "$B" && tar xzf "$RESUME" -C "$B" runs results logs; fi
mkdir -p "$M" "$R" "$S" "$L"
left() { echo $((secs - ($(date +%s) - start) - 25)); } # 25 s kept for the export and the packing
stamp=$(date -u +%H%M%S)
python3 studies/pretrain.py --models "$M" $smoke 2>&1 | tee "$L/pretrain-$stamp.log"
for kind in run proxy; do
  names=$work flag=
  [ $kind = proxy ] && names=$proxies flag=--proxy
  [ -z "$names" ] && continue
  [ "$(left)" -lt 20 ] && break
  log=$L/$kind-$stamp.log
  timeout "$(left)" python3 studies/transfer_study.py run $flag $smoke --workload "$names" --models "$M" \
    --runs "$R" --results "$S" >"$log" 2>&1
  echo "== $kind exit $? after $(($(date +%s) - start)) s"
  python3 studies/transfer_study.py export $flag $smoke --workload "$names" --models "$M" --runs "$R" --results "$S"
  grep -v '^\[.*\] [0-9]*/' "$log" | grep -E '^==|sweep [0-9]|Error|error|planned' | tail -40
done
for f in "$M"/*/pretrain.json; do cp "$f" "$L/pretrain-$(basename "$(dirname "$f")").json"; done
tar czf "$OUT/study.tar.gz" -C "$B" results runs logs
ls -la "$OUT"
echo "== done after $(($(date +%s) - start)) s"
