"""The names the package ships, written out without importing torch: the built-in pruning methods,
the model zoo and the datasets. The CLI offers them as ``choices`` and ``ntkfast --help`` lists
them at once; ``tests/test_cli.py`` checks each table against its registry
(:func:`ntkfast.methods.available`, :func:`ntkfast.models.available`,
:func:`ntkfast.data.available`), so they cannot drift apart.
"""

BUILTIN_METHODS = ("grasp", "iterative_snip", "magnitude", "ntksap", "ntt", "random", "snip", "synflow",
                   "synflow_dist", "synflow_l2", "synflow_l2_dist", "synflow_l2_squared")

ZOO_MODELS = ("lenet300_100", "lenet5", "conv4", "vgg11", "vgg16", "vgg19", "resnet20", "resnet32", "resnet56",
              "resnet18", "resnet50", "vit", "lstm")

DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "tiny-imagenet", "imagenet", "imagefolder")


def model_key(name: str) -> str:
    """How the zoo compares model names: case, '-' and '_' ignored ("ResNet-20" is resnet20)."""
    return name.lower().replace("-", "").replace("_", "")
