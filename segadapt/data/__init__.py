"""Datasets: readers of the on-disk layouts, transforms, sampling and the synthetic benchmark.

Importing the package registers the built-in readers in ``segadapt.registry.DATASETS``
(one module per layout; a new reader is one more module imported here, or a user's
module named under the config key ``imports:``).
"""
from segadapt.data import datasets  # noqa: F401  gta5, cityscapes, synthia, folder
from segadapt.data import acdc, custom, dark_zurich  # noqa: F401,E402
