"""Data: the one sample schema and loader (`samples`), the world's file names and task ids (`names`), and,
imported on use because they need torch and a model, the lazy training dataset (`dataset`) and the feature
cache of frozen encoders (`cache`)."""

from mmcompose.data.samples import (
    DEFAULT_MODALITIES,
    BadSample,
    Sample,
    SampleSet,
    detect_layout,
    load_files,
    load_samples,
    read_records,
    validate_records,
)

__all__ = [
    "DEFAULT_MODALITIES",
    "BadSample",
    "Sample",
    "SampleSet",
    "detect_layout",
    "load_files",
    "load_samples",
    "read_records",
    "validate_records",
]
