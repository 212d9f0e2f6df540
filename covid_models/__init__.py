"""The paper's nine models: builders, input pipeline, training and evaluation."""

from covid_models.builders import MODEL_NAMES, build_model

__all__ = ["MODEL_NAMES", "build_model"]
