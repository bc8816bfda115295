"""Models: the target detector's networks, their fastai training, and adversarial (robust) training."""
