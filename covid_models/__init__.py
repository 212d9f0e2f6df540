"""The paper's nine models: builders, input pipeline, training, the ensemble and the stored-model object."""

from covid_models.builders import MODEL_NAMES, build_model

__all__ = ["MODEL_NAMES", "build_model"]
