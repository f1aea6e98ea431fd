#!/usr/bin/env bash
# What ran beside a long benchmark, for its record: every 5 minutes, the 1-minute load and each other process whose
# ps %CPU (its average since it started) is over 20, appended to LOG as one line. The process group OWN (the
# benchmark's own, default this script's) is left out. Runs until killed.
#
#     benchmarks/beside.sh LOG [OWN_PGID] & sampler=$!; ...; kill $sampler
#
# A line with "%);" saw something beside the benchmark; `grep -c '%);' LOG` of `wc -l < LOG` samples did.
log=${1:?usage: beside.sh LOG [OWN_PGID]}
own=${2:-$(ps -o pgid= $$ | tr -d ' ')}
while sleep 300; do
  printf '%s load %s |' "$(date '+%F %T')" "$(cut -d' ' -f1 /proc/loadavg)"
  ps -eo pgid=,pcpu=,args= --sort=-pcpu | awk -v own="$own" '$1 != own && $2 > 20 {
    $1 = ""; pcpu = $2; $2 = ""; sub(/^ +/, ""); printf " %s (%s%%);", substr($0, 1, 80), pcpu }'
  echo
done >> "$log"
