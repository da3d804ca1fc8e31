# -------------------------------------------------------------- training (jobs/train.sh)
# The run folder is on the shared file system: rank 0 writes checkpoints, TensorBoard
# events and the exported model there directly, and a relative Horovod timeline lands
# there too (the job runs in it). A run folder with checkpoints is resumed, so every
# job of a --chain (here {{chain}}) continues where the previous one stopped.
mkdir -p "$STEMNET_RUN" && cd "$STEMNET_RUN" || exit 1

# 1. Stage: every rank copies the shards it reads to node-local storage. Same launch
#    geometry as step 2, so rank r stages on the node where rank r trains.
{{stage_step}}

# 2. Train, {{ranks}} ranks. SIGUSR2 (sent by the scheduler before the walltime kill) or
#    SIGTERM makes every rank checkpoint and stop at its next step. The batch shell
#    forwards them to the launcher and waits until the ranks have saved.
{{launch}} bash -c 'exec stemnet train --config "$STEMNET_CONFIG" --data "{{train_data}}" --out "$STEMNET_RUN" --no-progress' &
launcher=$!
trap 'echo "stemnet: signal received: every rank checkpoints and stops" >&2; kill -USR2 "$launcher" 2>/dev/null' USR2 TERM
wait "$launcher"; status=$?
while kill -0 "$launcher" 2>/dev/null; do wait "$launcher"; status=$?; done
trap - USR2 TERM

# 3. Copy back. Checkpoints are already in the run folder; files that ranks wrote under
#    $STEMNET_LOCAL_OUT (node-local) go to $STEMNET_RUN/node-out/<host>/.
{{copy_back}}

echo "stemnet: training exited with status $status; the next job of a chain resumes $STEMNET_RUN"
exit "$status"
