"""HTTP services: domain teachers that score token sequences, and the student's rollout server."""
