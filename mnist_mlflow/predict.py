"""A small client for a served model: PNG or JPEG files in, predicted digits out.

    python -m mnist_mlflow.predict --url http://127.0.0.1:5001 seven.png three.jpg

Each image (any size, colour or grey) is turned into what MNIST looks like: grey, the digit
light on a dark background (inverted when it is dark on light), fitted into a 20x20 box and
centred in 28x28 by its centre of mass. All readable files go in one request; an unreadable
file is reported by name and the others are still predicted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import requests


def image_to_mnist(path: str | Path) -> np.ndarray:
    """Reads an image file and returns float32 raw pixel intensities 0-255 of shape (28, 28, 1)."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        grey = ImageOps.exif_transpose(image).convert("L")
    pixels = np.asarray(grey, dtype=np.float32)
    # MNIST digits are light on dark. Judge the background by the border pixels.
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if border.mean() > 127:
        pixels = 255.0 - pixels
    # Crop to the ink, fit into 20x20 keeping the aspect ratio, centre by mass in 28x28.
    ink = np.argwhere(pixels > 0.2 * pixels.max()) if pixels.max() > 0 else np.empty((0, 2))
    if len(ink):
        (top, left), (bottom, right) = ink.min(axis=0), ink.max(axis=0) + 1
        pixels = pixels[top:bottom, left:right]
    height, width = pixels.shape
    scale = 20.0 / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    digit = np.asarray(Image.fromarray(pixels.astype(np.uint8)).resize(size, Image.LANCZOS), dtype=np.float32)
    canvas = np.zeros((28, 28), dtype=np.float32)
    top, left = (28 - digit.shape[0]) // 2, (28 - digit.shape[1]) // 2
    canvas[top:top + digit.shape[0], left:left + digit.shape[1]] = digit
    if canvas.sum() > 0:
        rows, columns = np.indices(canvas.shape)
        shift_rows = int(round(14 - (rows * canvas).sum() / canvas.sum()))
        shift_columns = int(round(14 - (columns * canvas).sum() / canvas.sum()))
        canvas = np.roll(canvas, (shift_rows, shift_columns), axis=(0, 1))
    return canvas.reshape(28, 28, 1)


def predict_images(url: str, images: np.ndarray, timeout_s: float = 60.0) -> np.ndarray:
    """POSTs a batch of (n, 28, 28, 1) raw-pixel images to ``url``/invocations; returns probabilities."""
    response = requests.post(
        url.rstrip("/") + "/invocations",
        json={"inputs": images.tolist()},
        timeout=timeout_s,
    )
    if response.status_code != 200:
        raise RuntimeError(f"{url} answered HTTP {response.status_code}: {response.text[:500]}")
    return np.asarray(response.json()["predictions"], dtype=np.float32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Predict the digit in each image file with a served model.")
    parser.add_argument("--url", default="http://127.0.0.1:5001", help="the model server (default: %(default)s)")
    parser.add_argument("images", nargs="+", help="PNG or JPEG files")
    args = parser.parse_args(argv)

    readable: list[str] = []
    arrays: list[np.ndarray] = []
    failed = 0
    for path in args.images:
        try:
            arrays.append(image_to_mnist(path))
            readable.append(path)
        except (OSError, ValueError) as error:
            print(f"{path}: cannot read image ({error})", file=sys.stderr)
            failed += 1
    if readable:
        try:
            probabilities = predict_images(args.url, np.stack(arrays))
        except (requests.RequestException, RuntimeError, KeyError, json.JSONDecodeError) as error:
            print(f"error: prediction request to {args.url} failed: {error}", file=sys.stderr)
            return 2
        for path, row in zip(readable, probabilities):
            digit = int(row.argmax())
            print(f"{path}: {digit} (probability {row[digit]:.3f})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
