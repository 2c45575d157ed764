"""mnist_dist: train the reference 8,440-parameter MNIST CNN on a CPU, one GPU, N GPUs or a cluster."""

__version__ = "0.1.0"
