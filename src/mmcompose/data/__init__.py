"""Data: the one sample schema and loader (`samples`), the world's file names and task ids (`names`), and,
imported on use because they need torch and a model, the lazy training dataset (`dataset`) and the feature
cache of frozen encoders (`cache`)."""

from mmcompose.data.samples import (
    DEFAULT_MODALITIES,
    BadSample,
    Sample,
    SampleSet,
    StoredSamples,
    detect_layout,
    iter_records,
    load_files,
    load_samples,
    read_records,
    stream_samples,
    validate_records,
)

__all__ = [
    "DEFAULT_MODALITIES",
    "BadSample",
    "Sample",
    "SampleSet",
    "StoredSamples",
    "detect_layout",
    "iter_records",
    "load_files",
    "load_samples",
    "read_records",
    "stream_samples",
    "validate_records",
]
