"""Plain PyTorch reference implementations: readable, eager, any device. They are the
specification the kernels are tested against."""
