#!/usr/bin/env bash
# Two processes on 127.0.0.1 (one CPU device each) train the smoke config; SIGTERM goes to
# process 0 only, mid-run. Both must stop at the same step (JAX's preemption sync point), save it
# once and exit with status 75. Usage, from the repository root:
#   bash experiments/faults/two_process_sigterm.sh [workdir]
set -u
W=${1:-/tmp/two_process_sigterm}
rm -rf "$W"
PY=${PY:-.venv/bin/python}
PORT=$($PY -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])")
FLAGS=(--config=configs/dino.py:smoke "--workdir=$W" --config.total_steps=400
       --config.log_every_steps=1 --config.checkpoint.every_steps=1000)
for i in 0 1; do
  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=1 \
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i \
    $PY main.py "${FLAGS[@]}" > "$W.$i.log" 2>&1 &
  pids[$i]=$!
done
for _ in $(seq 1 600); do  # until process 0 has logged 5 steps
  [ -f "$W/metrics.jsonl" ] && [ "$(wc -l < "$W/metrics.jsonl")" -ge 5 ] && break
  sleep 1
done
echo "SIGTERM to process 0 after $(wc -l < "$W/metrics.jsonl") logged steps"
kill -TERM "${pids[0]}"
wait "${pids[0]}"; echo "process 0 exit status $?"
wait "${pids[1]}"; echo "process 1 exit status $?"
grep -h "stopped by" "$W.0.log" "$W.1.log" | sed 's/^.*trainer.py:[0-9]*\] //'
echo "checkpoints: $(ls "$W/checkpoints")"
