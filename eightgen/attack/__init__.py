"""The attack: per-start losses, update rules, the optimisation loop and what is measured from its trajectories."""
