"""Data: the sources of 28x28 class datasets, their cut into a start pool and detector splits, and the attack starts."""
