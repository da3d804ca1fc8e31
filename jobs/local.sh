#!/bin/bash
# stemnet {{task}} job for {{machine}} (no scheduler). Rendered by `stemnet submit` from
# jobs/local.sh, jobs/setup.sh and jobs/{{task}}.sh, which runs it at once, in the
# foreground. Run it again by hand with: bash THIS_FILE
{{directives}}
#
# Geometry: {{geometry}}.
