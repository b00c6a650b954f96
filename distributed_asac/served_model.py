"""The code of every MLflow Model this project logs (MLflow's "models from code"): MLflow keeps a copy of this file
in each model and runs it to load the model, so loading never unpickles a Python object. The weights come from
the model's `weights` artifact (safetensors), the network and the image size from its `config` artifact (the run's
config.yaml, read with yaml.safe_load); the network's code is the installed project's (distributed_asac.models).

Input: uint8 RGB images N × S × S × 3 (S = the run's data.image_size), the form the run's own data pipeline
produces (decode → centred square crop → resize: distributed_asac.data.images.load_image) and the evaluation
read: the scaling to [0, 1] and the normalisation happen here and in the network, exactly as in the evaluation.
Output: one row per image, `probability` (softmax probability of the target, e.g. Smiling = 1) and `label`
(the predicted target, argmax of the target logits: the evaluation's `y_hat`).
"""

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from safetensors.torch import load_file

from distributed_asac.data.batches import to_pixels
from distributed_asac.models import create_model

CHUNK = 256  # images per forward: a large request is scored in pieces, so its memory stays bounded


class TargetClassifier(mlflow.pyfunc.PythonModel):
    """M(θ, ρ) of a checkpoint: images → the target's probability and predicted label."""

    def load_context(self, context) -> None:
        config = yaml.safe_load(Path(context.artifacts["config"]).read_text())
        model = create_model(config["model"]["backbone"], protected_classifier=config["model"]["protected_classifier"])
        model.load_state_dict(load_file(context.artifacts["weights"]))
        self.model = model.eval()
        self.image_size = int(config["data"]["image_size"])

    # The annotation is np.ndarray itself (no `from __future__ import annotations`): MLflow reads it, and for an array
    # it leaves the checking to the signature logged with the model, without warning that type hints are missing.
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        images = np.asarray(model_input)
        side = self.image_size
        if images.ndim != 4 or images.shape[1:] != (side, side, 3) or images.dtype != np.uint8:
            raise ValueError(f"this model takes uint8 RGB images of shape N × {side} × {side} × 3, got "
                             f"{images.dtype} {images.shape}; centre-crop and resize images to {side}×{side} "
                             "(distributed_asac.data.images.load_image)")
        logits = torch.empty(0, 2)
        with torch.no_grad():
            for start in range(0, len(images), CHUNK):
                chunk = np.ascontiguousarray(images[start:start + CHUNK].transpose(0, 3, 1, 2))  # NHWC → NCHW
                logits = torch.cat([logits, self.model.target_logits(to_pixels(torch.from_numpy(chunk)))])  # [n, 2]
        # the evaluation's score and y_hat (evaluate.py): softmax probability of class 1, argmax of the logits
        return pd.DataFrame({"probability": logits.softmax(1)[:, 1].numpy(), "label": logits.argmax(1).numpy()})


mlflow.models.set_model(TargetClassifier())
