"""`python -m distributed_asac.predict MODEL IMAGE...`: a model this project logged or registered, on image files.

    python -m distributed_asac.predict models:/demo-asac_fgsm/1 face1.jpg face2.png     # MLFLOW_TRACKING_URI set
    python -m distributed_asac.predict models:/demo-asac_fgsm/1 images.npy             # uint8 N × S × S × 3

Image files are decoded, centre-cropped and resized to the model's S × S as the run's data were
(data/images.py); a .npy file must hold uint8 RGB images of exactly that size. Prints one CSV line per image:
image, probability (of the target), label. The model is loaded with mlflow.pyfunc.load_model, from its code and
safetensors weights (served_model.py): nothing is unpickled.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from .data.images import load_image
from .errors import UserError, exit_on_user_error
from .mlflow_models import PROJECT


def model_info(uri: str):
    """The MLmodel of `uri` (nothing loaded yet), refused in one line if it is not one of this project's models."""
    import mlflow

    try:
        info = mlflow.models.get_model_info(uri)
    except Exception as err:  # noqa: BLE001 - an unknown name, version or store: the user's to fix, in one line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise UserError(f"no MLflow Model at {uri} in {mlflow.get_tracking_uri()} ({reason}); give a models:/<name>/"
                        "<version> of the MLflow UI's Models page and set MLFLOW_TRACKING_URI to its store") from None
    found = info.metadata or {}
    if found.get("project") != PROJECT:
        raise UserError(f"{uri} is not a model of {PROJECT}: an MLflow Model with flavors "
                        f"{', '.join(sorted(info.flavors))} (logged by {found.get('project') or 'another program'}); "
                        "give a version that a comparison or sweep of this project registered")
    return info


def read_images(paths: list[str], side: int, uri: str) -> np.ndarray:
    """uint8 N × side × side × 3 from image files (cropped and resized as the run's data) or one .npy file."""
    if len(paths) == 1 and paths[0].endswith(".npy"):
        try:
            images = np.load(paths[0], allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"{paths[0]} cannot be read as a .npy array ({err}); save the images with numpy.save")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (side, side, 3):
            raise UserError(f"{paths[0]} holds {images.dtype} images of shape {images.shape}, but {uri} takes uint8 "
                            f"RGB images N × {side} × {side} × 3 (the image size of its run); pass the image files "
                            "instead (they are centre-cropped and resized as the run's data were)")
        return images
    return np.stack([load_image(Path(path), side) for path in paths])


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distributed_asac.predict", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="models:/<name>/<version> (the Models page of the MLflow UI) or models:/<id>")
    parser.add_argument("images", nargs="+", help="image files, or one .npy file of uint8 N × S × S × 3")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        import mlflow

        if os.environ.get("MLFLOW_TRACKING_URI"):  # the command's store is the environment's, whatever this process
            mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # set before (a run sets its own globally)
        side = int(model_info(args.model).metadata["image_size"])
        images = read_images(args.images, side, args.model)
        predictions = mlflow.pyfunc.load_model(args.model).predict(images)
    names = args.images if len(images) == len(args.images) else [f"{args.images[0]}[{i}]" for i in range(len(images))]
    writer = csv.writer(sys.stdout)
    writer.writerow(["image", "probability", "label"])
    for name, probability, label in zip(names, predictions["probability"], predictions["label"]):
        writer.writerow([name, f"{probability:.6g}", int(label)])


if __name__ == "__main__":
    main()
