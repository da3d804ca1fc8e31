"""Running stemnet on clusters: machine profiles, job scripts, submission.

``machines`` (the one loader of ``configs/machines/*.yaml``, shared with the scaling
model), ``render`` (validated request -> batch script), ``submit`` (``stemnet submit``).
"""
