"""Model loading: built-in models from PyPI packages, local directories, cached hub names."""

from monitor.models.adapter import ModelAdapter
from monitor.models.builtin import BUILTIN_MODELS, BuiltinModel
from monitor.models.loading import LoadedModel, ModelLoadError, load_model

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "LoadedModel",
    "ModelAdapter",
    "ModelLoadError",
    "load_model",
]
