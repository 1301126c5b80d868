"""Per-dataset normalisation and class names.

``STATS[name]`` is ``(mean, std)`` per channel of the training pixels scaled to [0, 1]. For
CIFAR-100, Tiny-ImageNet and ImageNet these are the values NTK-SAP's ``Utils/load.py`` normalises
with (ImageNet's are also torchvision's); CIFAR-10's agree with that file to its three decimals.
SVHN's are the train-split values in common use (the papers this package follows do not use SVHN).
"""
from __future__ import annotations

__all__ = ["STATS", "MNIST_CLASSES", "FASHION_MNIST_CLASSES", "CIFAR10_CLASSES", "SVHN_CLASSES"]

STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
    "tiny-imagenet": ((0.480, 0.448, 0.397), (0.276, 0.269, 0.282)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SVHN_CLASSES = [str(i) for i in range(10)]  # the digit; the files' label 10 is the digit 0
