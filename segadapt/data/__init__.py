"""Datasets: readers of the on-disk layouts, transforms, sampling and the synthetic benchmark."""
