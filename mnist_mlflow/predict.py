"""A small client for a served model: PNG or JPEG files in, predicted digits out.

    python -m mnist_mlflow.predict --url http://127.0.0.1:5001 seven.png three.jpg

Each image (colour or grey, of up to 40 megapixels) is turned into what MNIST looks like: grey, the digit
light on a dark background (inverted when it is dark on light), fitted into a 20x20 box and
centred in 28x28 by its centre of mass. All readable files go in one request; an unreadable
file is reported by name and the others are still predicted.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import requests

# The most pixels an image file may declare. The client reads digits, which MNIST holds in 28 x 28;
# a phone's photo of one has up to a few tens of millions. A file's header may declare far more
# than its bytes hold (a tiny PNG of a blank giant picture decodes into gigabytes), so the
# declared size is checked before anything is decoded.
MAX_IMAGE_PIXELS = 40_000_000


def image_to_mnist(path: str | Path) -> np.ndarray:
    """Reads an image file and returns float32 raw pixel intensities 0-255 of shape (28, 28, 1)."""
    import stat

    from PIL import Image, ImageOps

    # Opening a FIFO, a device or a socket would block or never end: only regular files are images.
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise ValueError(f"{kind}; give the path of a PNG or JPEG file")
    with warnings.catch_warnings():
        # Pillow warns of a large image as it opens it; the check below says it in one line instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(path)
    with image:
        # Image.open reads the header only; the pixels are decoded by convert below.
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(
                f"it declares {width} x {height} = {width * height:,} pixels, more than the "
                f"{MAX_IMAGE_PIXELS:,} this client decodes; scale it down first"
            )
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
    canvas[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    if canvas.sum() > 0:
        rows, columns = np.indices(canvas.shape)
        shift_rows = int(round(14 - (rows * canvas).sum() / canvas.sum()))
        shift_columns = int(round(14 - (columns * canvas).sum() / canvas.sum()))
        canvas = np.roll(canvas, (shift_rows, shift_columns), axis=(0, 1))
    return canvas.reshape(28, 28, 1)


class BadAnswerError(RuntimeError):
    """The server's answer is not what the serving contract promises."""


def predict_images(url: str, images: np.ndarray, timeout_s: float = 60.0) -> np.ndarray:
    """POSTs a batch of (n, 28, 28, 1) raw-pixel images to ``url``/invocations; returns the answer's rows.

    Raises BadAnswerError when the answer is not JSON with a ``predictions`` list of rows.
    Rows are checked one by one by :func:`check_probabilities`.
    """
    response = requests.post(
        url.rstrip("/") + "/invocations",
        json={"inputs": images.tolist()},
        timeout=timeout_s,
    )
    if response.status_code != 200:
        raise BadAnswerError(f"{url} answered HTTP {response.status_code}: {response.text[:300]}")
    try:
        predictions = response.json()["predictions"]
    except (ValueError, KeyError, TypeError):
        raise BadAnswerError(
            f"{url} answered something that is not JSON with a 'predictions' list: {response.text[:200]!r}"
        ) from None
    if not isinstance(predictions, list):
        raise BadAnswerError(f"{url} answered 'predictions' that is not a list: {str(predictions)[:200]!r}")
    return predictions


def check_probabilities(row) -> np.ndarray:
    """One answer row as 10 class probabilities; raises ValueError when it is not that."""
    try:
        probabilities = np.asarray(row, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"the answer {str(row)[:80]!r} is not a list of numbers") from None
    if probabilities.shape != (10,):
        raise ValueError(f"the answer has shape {probabilities.shape}, not 10 class probabilities")
    if not np.all(np.isfinite(probabilities)):
        raise ValueError("the answer holds NaN or infinite probabilities")
    if np.any(probabilities < -1e-6) or np.any(probabilities > 1 + 1e-6) or abs(probabilities.sum() - 1.0) > 1e-3:
        raise ValueError(f"the answer does not sum to 1 over [0, 1] values (sum {probabilities.sum():.4g})")
    return probabilities


def main(argv=None) -> int:
    """Predicts every readable file; each bad file or bad answer gets one line naming the file.

    Exit status 0 when every file got a prediction, 1 when some file or answer was bad, 2
    when the request failed as a whole.
    """
    from PIL import Image

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
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            # DecompressionBombError: Pillow refuses to open over twice its own limit, before our check.
            print(f"{path}: cannot read image ({error})", file=sys.stderr)
            failed += 1
    if readable:
        try:
            rows = predict_images(args.url, np.stack(arrays))
        except (requests.RequestException, BadAnswerError) as error:
            print(f"error: prediction request to {args.url} failed: {error}", file=sys.stderr)
            return 2
        for index, path in enumerate(readable):
            if index >= len(rows):
                print(
                    f"{path}: no answer (the server returned {len(rows)} rows for {len(readable)} images)",
                    file=sys.stderr,
                )
                failed += 1
                continue
            try:
                probabilities = check_probabilities(rows[index])
            except ValueError as error:
                print(f"{path}: bad answer: {error}", file=sys.stderr)
                failed += 1
                continue
            digit = int(probabilities.argmax())
            print(f"{path}: {digit} (probability {probabilities[digit]:.3f})")
        if len(rows) > len(readable):
            print(f"error: the server returned {len(rows)} rows for {len(readable)} images", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
