"""The paper's experiment: single-modality models, compositions, baselines, lambda search, MCUB tables."""
