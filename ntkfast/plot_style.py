"""How a method, model, dataset and layer look in every ntkfast figure.

One table, :data:`METHOD_STYLES`, gives each pruning method a display name, a colour, a marker
and a line style; every plotting function (:mod:`ntkfast.report`, :mod:`ntkfast.plots`, the
benchmark figures) takes its looks from :func:`method_style`, so SynFlow is the same blue square
in every figure. Colours come from the Okabe-Ito palette, chosen to stay distinguishable under
the common colour-vision deficiencies; because nine or more methods share a plot, the marker and
the line style differ too, so that no two methods are told apart by colour alone (nor in
greyscale print). Variants of one method (SynFlow-L2, SynFlow-Dist) keep its hue family and
change the marker and line.

A method missing from the table (one a user registered) gets a fallback style derived from a
hash of its name: the same in every figure and every run, never one of the table's combinations.

This module does not import matplotlib: the values are plain strings and tuples that
matplotlib accepts (``ax.plot(x, y, **method_style("snip").line_kwargs())``)."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple, Union

__all__ = ["Style", "METHOD_STYLES", "MODEL_NAMES", "DATASET_NAMES", "OKABE_ITO", "method_style", "method_name",
           "model_name", "dataset_name", "layer_labels"]

#: the Okabe-Ito palette (Okabe and Ito, "Color Universal Design", 2008), by colour name
OKABE_ITO = {"black": "#000000", "orange": "#E69F00", "sky blue": "#56B4E9", "bluish green": "#009E73",
             "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "reddish purple": "#CC79A7"}
# the palette's yellow is too pale for a thin line on white; this is the same hue, darker
_DARK_YELLOW = "#B89B00"
_GREY = "#7F7F7F"

LineStyle = Union[str, Tuple[int, Tuple[int, ...]]]


@dataclass(frozen=True)
class Style:
    """The looks of one method: ``label`` (display name), ``color`` (a hex colour), ``marker`` and
    ``linestyle`` (matplotlib's names or a dash tuple)."""

    label: str
    color: str
    marker: str
    linestyle: LineStyle

    def line_kwargs(self) -> dict:
        """Keyword arguments for ``Axes.plot`` and ``Axes.errorbar``."""
        return {"color": self.color, "marker": self.marker, "linestyle": self.linestyle, "label": self.label}

    def scatter_kwargs(self) -> dict:
        """Keyword arguments for ``Axes.scatter``."""
        return {"color": self.color, "marker": self.marker, "label": self.label}


_DASH_DOT_DOT = (0, (5, 1.5, 1, 1.5, 1, 1.5))
_LONG_DASH = (0, (7, 2))

#: method id (as registered in :mod:`ntkfast.methods`) -> its looks in every figure
METHOD_STYLES: Dict[str, Style] = {
    "random": Style("Random", _GREY, "x", ":"),
    "magnitude": Style("Magnitude", OKABE_ITO["black"], "p", _DASH_DOT_DOT),
    "snip": Style("SNIP", OKABE_ITO["bluish green"], "^", "-"),
    "iterative_snip": Style("Iterative SNIP", OKABE_ITO["orange"], "v", "--"),
    "grasp": Style("GraSP", OKABE_ITO["reddish purple"], "P", "-."),
    "synflow": Style("SynFlow", OKABE_ITO["blue"], "s", "-"),
    "synflow_l2": Style("SynFlow-L2", OKABE_ITO["sky blue"], "D", "--"),
    "synflow_l2_squared": Style("SynFlow-L2 (squared paths)", OKABE_ITO["sky blue"], "d", ":"),
    "synflow_dist": Style("SynFlow-Dist", OKABE_ITO["blue"], "<", ":"),
    "synflow_l2_dist": Style("SynFlow-L2-Dist", OKABE_ITO["sky blue"], ">", "-."),
    "ntksap": Style("NTK-SAP", OKABE_ITO["vermillion"], "o", "-"),
    "ntt": Style("NTT", _DARK_YELLOW, "*", _LONG_DASH),
    # the Path Kernel's own pruning is SynFlow-L2; this entry is for figures of the kernel itself
    "pathkernel": Style("Path Kernel", OKABE_ITO["black"], "h", "--"),
}

#: model id (:func:`ntkfast.models.available`) -> the name papers use
MODEL_NAMES: Dict[str, str] = {
    "lenet300_100": "LeNet-300-100", "lenet5": "LeNet-5", "conv4": "Conv-4",
    "vgg11": "VGG-11", "vgg16": "VGG-16", "vgg19": "VGG-19",
    "resnet18": "ResNet-18", "resnet20": "ResNet-20", "resnet32": "ResNet-32", "resnet50": "ResNet-50",
    "resnet56": "ResNet-56",
}

#: dataset id (:func:`ntkfast.data.available`) -> the name papers use
DATASET_NAMES: Dict[str, str] = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10",
                                 "noise": "Gaussian noise"}

# the fallback styles: colours beyond the table's (Paul Tol's "muted" set, also safe for the
# common colour-vision deficiencies), markers and line styles the table does not use
_FALLBACK_COLORS = ("#332288", "#117733", "#44AA99", "#999933", "#882255", "#AA4499", "#CC6677", "#DDCC77")
_FALLBACK_MARKERS = ("H", "8", "X", "1", "2", "3", "4", "|")
_FALLBACK_LINES: Tuple[LineStyle, ...] = ("-", "--", "-.", ":", (0, (3, 1, 1, 1)), (0, (1, 2)))


def method_style(method: str) -> Style:
    """The looks of ``method`` (a registered id such as ``"ntksap"``): its entry in
    :data:`METHOD_STYLES`, or for a method not in the table a fallback chosen by a hash of the
    name (stable across runs and processes, unlike Python's ``hash``), labelled by the name."""
    if not isinstance(method, str):
        raise TypeError(f"method: expected a method name (str), got {type(method).__name__}")
    if method in METHOD_STYLES:
        return METHOD_STYLES[method]
    h = int.from_bytes(hashlib.sha1(method.encode("utf-8")).digest()[:8], "big")
    return Style(method, _FALLBACK_COLORS[h % len(_FALLBACK_COLORS)],
                 _FALLBACK_MARKERS[(h // 8) % len(_FALLBACK_MARKERS)],
                 _FALLBACK_LINES[(h // 64) % len(_FALLBACK_LINES)])


def method_name(method: str) -> str:
    """The display name of ``method`` (``"ntksap"`` -> ``"NTK-SAP"``); an unknown one as it is."""
    return method_style(method).label


def model_name(model: str) -> str:
    """The display name of a zoo model (``"lenet300_100"`` -> ``"LeNet-300-100"``); another as it is."""
    return MODEL_NAMES.get(model, str(model))


def dataset_name(dataset: str) -> str:
    """The display name of a dataset (``"cifar10"`` -> ``"CIFAR-10"``); another as it is."""
    return DATASET_NAMES.get(dataset, str(dataset))


_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def layer_labels(names: Sequence[str]) -> List[str]:
    """Short labels for the weight names of one network, in its order, for a figure's axis.

    The zoo's sequential stacks are numbered by kind: ``features.N`` and ``layers.N.conv``
    (convolutions) become ``conv1``, ``conv2``..., ``classifier.N`` become ``fc1``, ``fc2``...
    (a single classifier layer is ``fc``); a residual block's ``blocks.3.conv1`` becomes
    ``block 3 conv1`` and its projection ``blocks.3.shortcut.0`` ``block 3 shortcut``. Any
    other name is kept, less its ``.weight``. Two names never get one label: where the rules
    would merge them, the ids are kept."""
    stems = [str(n).removesuffix(".weight") for n in names]
    convs = [s for s in stems if re.fullmatch(r"features\.\d+|layers\.\d+\.conv", s)]
    fcs = [s for s in stems if re.fullmatch(r"classifier\.\d+", s)]
    out = []
    for s in stems:
        block = _BLOCK.fullmatch(s)
        if s in convs:
            out.append(f"conv{convs.index(s) + 1}")
        elif s in fcs:
            out.append(f"fc{fcs.index(s) + 1}" if len(fcs) > 1 else "fc")
        elif block:
            rest = re.sub(r"^shortcut(\.0)?$", "shortcut", block.group(2))
            out.append(f"block {block.group(1)} {rest}")
        else:
            out.append(s)
    if len(set(out)) < len(out):
        return stems
    return out
