#!/bin/bash
# stemnet {{task}} job for {{machine}} (LSF). Rendered by `stemnet submit` from jobs/lsf.sh,
# jobs/setup.sh and jobs/{{task}}.sh: edit those, not this copy. Submit with: bsub < THIS_FILE
{{directives}}
#
# Geometry: {{geometry}}.
# jsrun: one resource set per rank. -n resource sets in all (nodes x ranks per node),
# -a 1 task per set, -c physical cores per set, -g GPUs per set, -r sets per node,
# -b packed:c binds each task to its c cores (all their hardware threads, see smt in
# -alloc_flags).
