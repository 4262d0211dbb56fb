"""Makes testdata/pillow_bilinear.pt: Pillow's BILINEAR resize of a few images, the reference for
train_tiny.resize_like_pillow (which reproduces the official video transform without Pillow).

    python testdata/make_pillow_fixture.py testdata/pillow_bilinear.pt     # needs Pillow (the official code pins 8.2.0)

The checked-in file was made with Pillow 8.2.0; Pillow 13.0.0 gives the same bytes.
"""

import sys

import numpy as np
import PIL
import torch
from PIL import Image


def smooth(n):  # a smooth pattern, as frames are; the test makes it again instead of loading it
    y, x = np.mgrid[0:n, 0:n]
    return np.stack([(127 + 120 * np.sin(x / 17.0 + c) * np.cos(y / 23.0 - c)) for c in range(3)], -1).astype(np.uint8)


def main(path):
    cases = {"pillow": PIL.__version__}
    for n, size, seed in [(64, 20, 0), (64, 38, 1), (64, 76, 2), (512, 268, None)]:
        img = smooth(n) if seed is None else np.random.default_rng(seed).integers(0, 256, (n, n, 3), dtype=np.uint8)
        cases[f"{n}to{size}"] = torch.from_numpy(np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR)).copy())
        if seed is not None:
            cases[f"{n}to{size}_input"] = torch.from_numpy(img)
    torch.save(cases, path)


if __name__ == "__main__":
    main(sys.argv[1])
