#!/bin/bash
# stemnet {{task}} job for {{machine}} (Slurm). Rendered by `stemnet submit` from jobs/slurm.sh,
# jobs/setup.sh and jobs/{{task}}.sh: edit those, not this copy. Submit with: sbatch THIS_FILE
{{directives}}
#
# Geometry: {{geometry}}.
# srun: -N nodes, -n ranks in all, --ntasks-per-node, -c CPUs per rank (cores x hardware
# threads the machine counts per core), --gpus-per-task GPUs per rank, plus the
# machine's launcher_flags (GPU/CPU binding).
