"""The five-point face templates the exporter writes into embedder files (`face.embedder.template`).

One definition, here: the service never needs it, because it reads each model's template from that model's
metadata (docs/model-contract.md). Plain Python (no numpy, no torch), so anything may import it cheaply.
"""

from __future__ import annotations

# The standard ArcFace template for 112x112 crops: left eye, right eye, nose tip, left and right mouth corners,
# in the crop's pixel coordinates (x, y). InsightFace's `arcface_dst`; the ArcFace training crops were made
# with it.
ARCFACE_TEMPLATE_112: list[list[float]] = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
]


def template_for(input_size: tuple[int, int]) -> list[list[float]]:
    """The five reference points for a crop of (height, width), as a new list.

    112x112 is the ArcFace template; 112x96 is the same points 8 px left (SphereFace crops). Any other size (e.g.
    ResNetFace's 128x128) scales the 112x112 template with the crop: an assumption, as those models' authors
    published no template of their own.
    """
    h, w = input_size
    if (h, w) == (112, 112):
        return [list(p) for p in ARCFACE_TEMPLATE_112]
    if (h, w) == (112, 96):
        return [[x - 8.0, y] for x, y in ARCFACE_TEMPLATE_112]
    return [[round(x * w / 112, 4), round(y * h / 112, 4)] for x, y in ARCFACE_TEMPLATE_112]
