"""The student's rollout service (sampling with log-probs, weight updates); built in the trainer issue."""
