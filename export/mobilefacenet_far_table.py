"""The default recognizer's FAR(t) table (`face.embedder.far_table`), pinned here because the product may not
depend on ../shared at set-up; /identify sets its threshold for the gallery's size from it (service/decision.py).

Measured by `python -m evaluate identify --people ../shared/data/lfw-dev/images` (the served pipeline, every
different-person pair of lfw-dev's 3,890 photos); tests/test_default_recognizer.py re-measures it under `-m slow`
and checks that the pinned points still hold. Regenerate it with that command's far_table.json.
"""

FAR_TABLE = {
    "thresholds": [
        0.13, 0.14, 0.15, 0.16, 0.17, 0.18, 0.19, 0.2,
        0.21, 0.22, 0.23, 0.24, 0.25, 0.26, 0.27, 0.28,
        0.29, 0.3, 0.31, 0.32, 0.33, 0.34, 0.35, 0.36,
        0.37, 0.38, 0.39, 0.4, 0.41, 0.42, 0.43, 0.44,
        0.45, 0.46, 0.47, 0.48, 0.49, 0.5, 0.51, 0.52,
        0.53, 0.54, 0.55, 0.56, 0.57, 0.58, 0.59, 0.6,
        0.61, 0.62, 0.63, 0.64, 0.65, 0.66, 0.67, 0.68,
        0.69, 0.7, 0.71, 0.72, 0.73, 0.74, 0.75, 0.76,
        0.77, 0.78, 0.79, 0.8, 0.81, 0.82, 0.83, 0.84,
        0.85, 0.86, 0.87, 0.88, 0.89, 0.9, 0.91, 0.92,
        0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0,
    ],
    "far": [
        0.208571, 0.189549, 0.171727, 0.154935, 0.139273, 0.12468,
        0.111205, 0.0987885, 0.0873833, 0.0769424, 0.0675271, 0.0589536,
        0.0513363, 0.0444047, 0.0382282, 0.0328002, 0.0280343, 0.0238144,
        0.0201538, 0.0169808, 0.0142146, 0.0118099, 0.00978914, 0.0080817,
        0.00660254, 0.00536095, 0.00433944, 0.0034928, 0.00278265, 0.00220676,
        0.00174183, 0.00135733, 0.00104928, 0.000809744, 0.000622981, 0.000479206,
        0.000357652, 0.000267181, 0.000199724, 0.000147479, 0.000106476, 7.71121e-05,
        5.3833e-05, 3.79609e-05, 2.65858e-05, 1.86498e-05, 1.41527e-05, 8.99421e-06,
        5.81978e-06, 4.23257e-06, 2.38082e-06, 1.58721e-06, 1.24425e-06, 8.45964e-07,
        5.75169e-07, 3.91055e-07, 2.65877e-07, 1.80769e-07, 1.22904e-07, 8.35624e-08,
        5.68138e-08, 3.86275e-08, 2.62627e-08, 1.7856e-08, 1.21402e-08, 8.2541e-09,
        5.61193e-09, 3.81554e-09, 2.59417e-09, 1.76377e-09, 1.19918e-09, 8.1532e-10,
        5.54334e-10, 3.7689e-10, 2.56246e-10, 1.74221e-10, 1.18452e-10, 8.05354e-11,
        5.47558e-11, 3.72283e-11, 2.53114e-11, 1.72092e-11, 1.17005e-11, 7.9551e-12,
        5.40865e-12, 3.67732e-12, 2.5002e-12, 1.69988e-12,
    ],
    "measured_to": 0.64,
    "impostor_pairs": 7560418,
    "rule": (
        'share of different-person pairs with cosine >= t, over every pair of 3890 photos of 2195 people in l'
        'fw-dev/images, served pipeline: RetinaFace landmarks (central face), 5-point alignment, mobilefacene'
        't_192.onnx (sha256 cc983d3ed555 when measured), mirror averaging on; points every 0.01 backed by at '
        'least 10 pairs'
    ),
    "extrapolation": (
        'log FAR linear in t, fitted by least squares to the measured FAR between 0.552 and 0.643 (5e-05 to 1'
        '.3e-06): FAR(t) = exp(11.4809 -38.5814 t)'
    ),
}
