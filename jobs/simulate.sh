# ---------------------------------------------------------- simulation (jobs/simulate.sh)
# Every rank writes its own shards into $STEMNET_DATA; `stemnet simulate` reads its rank
# from {{rank}} and the world size from {{world}}. Samples already written are skipped,
# so a resubmitted (or chained) job resumes where the last one stopped.
mkdir -p "$STEMNET_DATA" && cd "$STEMNET_DATA" || exit 1

# 1. Simulate, {{ranks}} ranks (one per GPU/core set), one shard per rank and split.
{{launch}} stemnet simulate --config "$STEMNET_CONFIG" --out "$STEMNET_DATA" --no-progress --wait 0
status=$?

# 2. Finalize: write manifest.json once every sample is present (one process).
if [ "$status" -eq 0 ]; then
  stemnet simulate --finalize "$STEMNET_DATA" --config "$STEMNET_CONFIG"
  status=$?
else
  echo "stemnet: simulation ranks failed (status $status); submit again to finish the missing samples" >&2
fi
exit "$status"
