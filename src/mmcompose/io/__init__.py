"""Decoding of real input files (and arrays) into validated numpy arrays, one loader per modality.

Every loader returns a fixed dtype and layout documented in its docstring and raises
`mmcompose.errors.InputError` with a one-line message naming the input and the cause for anything it cannot
use: missing/empty/corrupt/truncated/mislabelled files, wrong shapes, NaN/Inf, or sizes beyond its guard.
"""

from mmcompose.io.audio import fit_length, load_audio
from mmcompose.io.image import load_image
from mmcompose.io.points import load_points
from mmcompose.io.video import load_video

__all__ = ["fit_length", "load_audio", "load_image", "load_points", "load_video"]
