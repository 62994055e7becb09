"""What the trainer and the services both need to run a model: loading it, its image side, and the one log-prob
kernel, so that the teacher's scores and the student's log-probs (whose difference is OPD's advantage) come from
the same code. Needs torch and transformers, imported where used so that reading a constant stays cheap."""
