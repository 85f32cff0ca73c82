"""Stage 2: a pairwise reward model on preference data (`python -m reward_model`, `make rm`)."""
