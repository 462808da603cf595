"""Training: the world's base LLM (`base_llm`), modality models in two stages (`trainer`), their data (`data`).

Submodules are imported on use: `mmcompose.train.tokenizer` must stay cheap to import (tests and the base-LLM
fixtures use it), while the trainer pulls in accelerate.
"""
