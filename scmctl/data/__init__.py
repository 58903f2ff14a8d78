"""Datasets (built-in digits, image folders, CIFAR-10 archives, arrays) and image I/O."""
