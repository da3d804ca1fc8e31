# ------------------------------------------------------------------ set-up (jobs/setup.sh)
set -eo pipefail  # a failing module load or activation stops the job here
JOB_ID={{job_id}}
echo "stemnet: {{task}} job $JOB_ID on {{machine}} ($(hostname), $(date '+%Y-%m-%d %H:%M:%S')): {{geometry}}"

# Software: modules, environment and Python from the machine profile
{{modules}}
{{machine_env}}
{{activate}}
command -v stemnet >/dev/null \
  || { echo "stemnet: 'stemnet' is not on PATH; fix 'activate' in the {{machine}} profile" >&2; exit 1; }

# Paths (absolute, on the shared file system) and threads per rank
{{paths}}

# Horovod settings from the config's distributed: section (read before hvd.init())
{{horovod_env}}
set +e  # from here on every step checks its own exit status
