"""How usable a detected face is for recognition: cheap signals from what the pipeline already has, and one score.

Signals (per face; `FaceQuality`):
- `face_size`: inter-ocular distance in pixels of the image as sent (the distance between the two eye
  landmarks). Small faces carry little detail; the embedder sees them upscaled.
- `detector_score`: the detector's face probability.
- `yaw`, `pitch`, `roll` in degrees: head pose from the five landmarks, by fitting a generic 3D model of those
  five points (`MODEL_POINTS`) with OpenCV's solvePnP under a pinhole camera whose focal length is the image's
  longer side. Zero is the pose of the alignment template (a frontal face): the template itself is fitted once
  and its angles subtracted, so that the generic model's own tilt does not read as pose. Yaw is positive when
  the face turns to the viewer's left (its nose towards the left of the image), pitch positive when it looks
  down, roll positive when it leans clockwise in the image. Five points give a coarse estimate (a few degrees
  near frontal, more at large angles), enough to tell frontal, three-quarter and profile apart.
- `sharpness`: variance of the Laplacian of the grey aligned crop's central region (the crop is the embedder's
  input, so every face is measured at the same scale): low for blurred and upscaled faces.
- `brightness` and `contrast`: mean and standard deviation of that region's grey levels (0-255).
- `embedding_norm`: the length of the face's embedding before L2 normalisation. Margin-trained embedders
  (ArcFace-style losses) give recognisable faces longer embeddings; measured on this model and lfw-dev, it is
  the strongest single predictor of a same-person pair's similarity (Spearman 0.54 for the pair's shorter one;
  every other signal 0.15 at most either way there, as `python -m evaluate quality` prints).

`quality` in [0, 1] combines them (`score`): the cosine similarity two photos of the same person, each of this
quality, are expected to reach with the default embedder, clipped to [0, 1]. It is linear in the embedding norm's
log, the face size's log and the two pose angles, fitted on ../shared/data/lfw-dev's same-person pairs
(`python -m evaluate quality`, which also draws the error-versus-discard curve); its coefficients are
`QUALITY_MODEL` below. Sharpness, brightness, contrast and the detector score are left out of the score (LFW's
photos are all sharp, lit and confidently detected, so it cannot weigh them; the detector score is about 1.0 for
every face) and act through the enrolment minimums instead. The norm's scale belongs to the embedder: with
another model the score is uncalibrated (the signals keep their meaning). A face whose quality is near or below
the 1:1 threshold (0.41 for the default model) is likely to be missed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np

# A generic head's five landmarks (x right, y up, z towards the camera; arbitrary units about a millimetre): eye
# centres, nose tip, mouth corners, in the detector's landmark order (left eye as seen in the image first).
MODEL_POINTS = np.array(
    [
        [-33.0, 35.0, -30.0],
        [33.0, 35.0, -30.0],
        [0.0, 0.0, 0.0],
        [-27.0, -30.0, -25.0],
        [27.0, -30.0, -25.0],
    ],
    dtype=np.float64,
)

# The central region of a 112x112 aligned crop that holds the face (eyes to chin, cheek to cheek), scaled with
# other crop sizes: where brightness, contrast and sharpness are measured, so the background and the black
# border of a face cut by the image edge do not count.
_REGION_112 = (slice(28, 104), slice(20, 92))

# The fitted combination: quality = clip(intercept + sum(weight * feature), 0, 1), features as in `features`.
# Fitted by `python -m evaluate quality` on all of lfw-dev's same-person pairs (its curve scores each fold with
# a model fitted on the other four).
QUALITY_MODEL: dict[str, float] = {
    "intercept": -2.403115,
    "log_embedding_norm": 0.567212,
    "log_face_size": 0.091209,
    # Small and positive: with the norm in the model, a turned face is missed less often than its shorter
    # embedding alone predicts. The enrolment minimums on pose are what refuse turned faces.
    "abs_yaw": 0.001036,
    "abs_pitch": 0.000094,
}


@dataclass(frozen=True)
class FaceQuality:
    face_size: float  # inter-ocular distance, image pixels
    detector_score: float
    yaw: float  # degrees
    pitch: float  # degrees
    roll: float  # degrees
    sharpness: float  # variance of the Laplacian, grey levels squared
    brightness: float  # mean grey level, 0-255
    contrast: float  # standard deviation of grey levels
    embedding_norm: float  # length of the embedding before L2 normalisation
    quality: float  # 0-1, see the module docstring

    def as_dict(self) -> dict[str, float | None]:
        """Rounded to 4 decimals; None for an angle the landmarks gave no pose for."""
        return {k: round(float(v), 4) if math.isfinite(v) else None for k, v in asdict(self).items()}


def head_pose(landmarks: np.ndarray, image_shape: tuple[int, ...], template: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of five (x, y) landmarks, relative to the pose of `template` (the aligned
    crop's five points, a frontal face). See the module docstring for the method and the signs."""
    raw = _raw_pose(np.asarray(landmarks, dtype=np.float64).reshape(5, 2), max(image_shape[:2]))
    frontal = _template_pose(tuple(map(tuple, np.asarray(template, dtype=np.float64).reshape(5, 2))))
    return tuple(_wrap(r - f) for r, f in zip(raw, frontal))  # type: ignore[return-value]


@functools.lru_cache(maxsize=8)
def _template_pose(template: tuple) -> tuple[float, float, float]:
    points = np.asarray(template, dtype=np.float64)
    return _raw_pose(points * 4.0, 4.0 * float(points.max()) * 2)  # as a 4x larger face: far from pixel rounding


def _raw_pose(points: np.ndarray, focal: float) -> tuple[float, float, float]:
    centre = points.mean(axis=0)
    camera = np.array([[focal, 0, centre[0]], [0, focal, centre[1]], [0, 0, 1]], dtype=np.float64)
    # The image's y axis points down, the model's up: flip the model so both are right-handed alike.
    model = MODEL_POINTS * np.array([1.0, -1.0, -1.0])
    # EPnP (closed form, four or more points), then Levenberg-Marquardt on the reprojection error.
    ok, rvec, tvec = cv2.solvePnP(model, points, camera, None, flags=cv2.SOLVEPNP_EPNP)
    if not ok or not np.isfinite(rvec).all():
        return (math.nan, math.nan, math.nan)
    rvec, tvec = cv2.solvePnPRefineLM(model, points, camera, None, rvec, tvec)
    rotation, _ = cv2.Rodrigues(rvec)
    # Euler angles (x: pitch, y: yaw, z: roll) of R = Rz Ry Rx.
    sy = math.hypot(rotation[0, 0], rotation[1, 0])
    pitch = math.degrees(math.atan2(rotation[2, 1], rotation[2, 2]))
    yaw = math.degrees(math.atan2(-rotation[2, 0], sy))
    roll = math.degrees(math.atan2(rotation[1, 0], rotation[0, 0]))
    return (yaw, pitch, roll)


def _wrap(degrees: float) -> float:
    return (degrees + 180.0) % 360.0 - 180.0


def crop_statistics(crop: np.ndarray) -> tuple[float, float, float]:
    """(sharpness, brightness, contrast) of an aligned BGR uint8 crop, over its central face region."""
    h, w = crop.shape[:2]
    rows = slice(_REGION_112[0].start * h // 112, _REGION_112[0].stop * h // 112)
    cols = slice(_REGION_112[1].start * w // 112, _REGION_112[1].stop * w // 112)
    grey = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)[rows, cols]
    sharpness = float(cv2.Laplacian(grey, cv2.CV_64F).var())
    return sharpness, float(grey.mean()), float(grey.std())


def features(signals: dict[str, float | None]) -> dict[str, float]:
    """The signals the score reads, as it reads them: logs where effects are multiplicative, magnitudes of
    angles (turning either way costs alike; no pose reads as the worst)."""

    def angle(value: float | None) -> float:
        return min(abs(value), 90.0) if value is not None and math.isfinite(value) else 90.0

    return {
        "log_embedding_norm": math.log(max(signals["embedding_norm"], 1e-6)),
        "log_face_size": math.log(max(signals["face_size"], 1.0)),
        "abs_yaw": angle(signals["yaw"]),
        "abs_pitch": angle(signals["pitch"]),
    }


def score(signals: dict[str, float], model: dict[str, float] | None = None) -> float:
    """The fitted combination (QUALITY_MODEL unless `model` is given), clipped to [0, 1]."""
    model = QUALITY_MODEL if model is None else model
    f = features(signals)
    value = model["intercept"] + sum(weight * f[name] for name, weight in model.items() if name != "intercept")
    return float(min(max(value, 0.0), 1.0))


def assess(
    image_shape: tuple[int, ...],
    landmarks: np.ndarray,
    detector_score: float,
    crop: np.ndarray,
    template: np.ndarray,
    embedding_norm: float,
) -> FaceQuality:
    """Every signal of one face, and its score: landmarks in image pixels, `crop` the face aligned onto
    `template` (what the embedder sees), `embedding_norm` its embedding's length before normalisation."""
    points = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    yaw, pitch, roll = head_pose(points, image_shape, template)
    sharpness, brightness, contrast = crop_statistics(crop)
    signals = {
        "face_size": float(np.linalg.norm(points[1] - points[0])),
        "detector_score": float(detector_score),
        "yaw": yaw,
        "pitch": pitch,
        "roll": roll,
        "sharpness": sharpness,
        "brightness": brightness,
        "contrast": contrast,
        "embedding_norm": float(embedding_norm),
    }
    return FaceQuality(**signals, quality=score(signals))


@dataclass(frozen=True)
class Minimums:
    """What an enrolment face must reach (FACE_ENROLL_* settings; the defaults and how they were measured are in
    service/settings.py)."""

    face_size: float  # inter-ocular distance, pixels
    max_yaw: float  # degrees, either way
    max_pitch: float  # degrees, either way
    sharpness: float
    brightness: float
    max_brightness: float
    quality: float


def refuse_poor_face(q: FaceQuality, minimums: Minimums) -> None:
    """Raise the PoorFace error (service/errors.py) of the first minimum `q` misses, with a sentence a person
    can act on; return quietly when every minimum is met."""
    from service.errors import ExtremePose, HighBrightness, LowBrightness, LowQuality, LowSharpness, SmallFace

    details = {"quality": q.as_dict()}
    # Pose first: a turned head also shows its eyes closer together, and turning back is the fix then.
    if not (abs(q.yaw) <= minimums.max_yaw and abs(q.pitch) <= minimums.max_pitch):  # NaN: no pose, refused too
        raise ExtremePose(
            f"the head is turned {q.yaw:.0f}° sideways and {q.pitch:.0f}° up or down (at most {minimums.max_yaw:g}° "
            f"and {minimums.max_pitch:g}°): face the camera",
            details={**details, "max_yaw": minimums.max_yaw, "max_pitch": minimums.max_pitch},
        )
    if q.face_size < minimums.face_size:
        raise SmallFace(
            f"the face is {q.face_size:.0f} px between the eyes, fewer than {minimums.face_size:g}: move closer or "
            "send a larger photo", details={**details, "minimum_face_size": minimums.face_size},
        )
    if q.brightness < minimums.brightness:
        raise LowBrightness(
            f"the face is too dark (brightness {q.brightness:.0f} of 255, at least {minimums.brightness:g}): add "
            "light in front of the face", details={**details, "minimum_brightness": minimums.brightness},
        )
    if q.brightness > minimums.max_brightness:
        raise HighBrightness(
            f"the face is overexposed (brightness {q.brightness:.0f} of 255, at most {minimums.max_brightness:g}): "
            "less light, or no flash", details={**details, "maximum_brightness": minimums.max_brightness},
        )
    # After brightness: a dark face also has little contrast to be sharp with, and light is the fix then.
    if q.sharpness < minimums.sharpness:
        raise LowSharpness(
            f"the face is blurred (sharpness {q.sharpness:.0f}, at least {minimums.sharpness:g}): hold the camera "
            "still and focus on the face", details={**details, "minimum_sharpness": minimums.sharpness},
        )
    if q.quality < minimums.quality:
        raise LowQuality(
            f"the face's overall quality is {q.quality:.2f}, below {minimums.quality:g}: send a sharp, well-lit "
            "photo taken from the front", details={**details, "minimum_quality": minimums.quality},
        )
