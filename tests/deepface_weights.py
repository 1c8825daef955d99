"""Random DeepFace weights written by DeepFace's own model builders (tests and benchmarks).

No DeepFace weights ship in a pip package and the hubs are unreachable, so tests exercise
the real loading path (``DeepFace.build_model`` -> ``load_model_weights`` from
``$DEEPFACE_HOME/.deepface/weights``) with randomly initialised weights: each PyTorch model
is built by its module's ``load_model()`` while the download returns the target path and the
loader saves the fresh ``state_dict`` instead of reading it. About 1.6 GB (Age 514 MB,
Gender 512 MB, Emotion 6 MB, VGG-Face 553 MB), 10 s (faces-train-serve notes §3).
Random weights give constant outputs: assert plumbing and shapes with them, not accuracy.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from unittest import mock

#: DeepFace PyTorch modules whose ``load_model()`` writes one weight file each.
MODULES = ("deepface.models.demography.pytorch.Age", "deepface.models.demography.pytorch.Gender",
           "deepface.models.demography.pytorch.Emotion", "deepface.models.facial_recognition.pytorch.VGGFace")


def write_random_deepface_weights(home: Path) -> Path:
    """Write random ``.pth`` weights for Age, Gender, Emotion and VGG-Face under
    ``home/.deepface/weights`` (returned). Never touches the network."""
    os.environ["DEEPFACE_BACKEND_ENGINE"] = "pytorch"
    import torch

    weights = Path(home) / ".deepface" / "weights"
    weights.mkdir(parents=True, exist_ok=True)

    def target(file_name, source_url, compress_type=None):
        return str(weights / file_name)

    def save(model, weight_file):
        torch.save(model.state_dict(), weight_file)
        return model

    torch.manual_seed(0)
    for name in MODULES:
        module = importlib.import_module(name)
        with mock.patch.object(module.weight_utils, "download_weights_if_necessary", target), \
                mock.patch.object(module, "load_model_weights", save):
            module.load_model()
    return weights
