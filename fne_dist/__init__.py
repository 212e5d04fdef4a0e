"""fne-dist: False Negative Elimination for image-text matching, from one CPU to many GPUs."""

__version__ = "0.1.0"
