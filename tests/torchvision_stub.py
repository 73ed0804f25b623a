"""The torchvision stand-in lives with the benchmarks (they time `SAM2ImagePredictor` too)."""

from benchmarks.torchvision_stub import Normalize, Resize, ToTensor, install  # noqa: F401
