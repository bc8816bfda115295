"""eightgen: push MNIST pixels along a classifier's gradient until it says 8, and measure what happens."""

__version__ = "0.1.0"
