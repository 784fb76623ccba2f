"""Face endpoints: /detect, /verify, /identify."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

import numpy as np
from fastapi import APIRouter, Depends, Request

from service import vectors
from service.api.runtime import Runtime, RuntimeDep
from service.api.schemas import (
    DetectOptions,
    DetectResponse,
    IdentifiedFace,
    IdentifyDecision,
    IdentifyOptions,
    IdentifyResponse,
    IdentityMatch,
    ImageInfo,
    VerifiedFace,
    VerifyOptions,
    VerifyResponse,
    error_responses,
    face_out,
)
from service.api.uploads import ImageUpload, openapi_body, read_request
from service.errors import Conflict, InvalidParameter, ModelMismatch, NoFace
from service.pipeline import Face, largest
from service.security import require_api_key

router = APIRouter(
    tags=["faces"],
    dependencies=[Depends(require_api_key)],
    responses=error_responses(400, 401, 413, 415, 422, 503),
)


def image_info(image: np.ndarray) -> ImageInfo:
    return ImageInfo(width=image.shape[1], height=image.shape[0])


@router.post(
    "/detect",
    response_model=DetectResponse,
    summary="Find faces in an image",
    description="Boxes, scores and five landmarks of every face, best score first.",
    openapi_extra=openapi_body(DetectOptions, images=("image",), required=("image",)),
)
async def detect(request: Request, runtime: RuntimeDep) -> DetectResponse:
    async with (
        read_request(
            request, DetectOptions, images=("image",), required=("image",),
            max_image_bytes=runtime.settings.max_image_bytes,
        ) as body,
        runtime.admitted(body.one("image")),
    ):
        image = await runtime.decode(body.one("image"))
        faces = await runtime.faces(image, body.options, embed=False, max_faces=body.options.max_faces)
        return DetectResponse(image=image_info(image), faces=[face_out(f) for f in faces])


async def _chosen_face(
    runtime: Runtime, upload: ImageUpload, options: VerifyOptions, index: int | None
) -> tuple[Face, int, int]:
    """The face of one image to verify with: the requested index, or the largest; embedded."""
    image = await runtime.decode(upload)
    faces = await runtime.faces(image, options, embed=False)
    if not faces:
        raise NoFace(f"no face found in {upload.field}", details=upload.describe())
    if index is None:
        best = largest(faces)
        index = next(i for i, f in enumerate(faces) if f is best)
    elif index >= len(faces):
        raise InvalidParameter(
            f"{upload.field} has {len(faces)} face(s); face index {index} does not exist",
            details={**upload.describe(), "faces_found": len(faces), "face_index": index},
        )
    face = faces[index]
    await runtime.embed(image, [face])
    return face, index, len(faces)


async def _identity_similarity(runtime: Runtime, identity_id: str, embedding: np.ndarray) -> float:
    """Best similarity between `embedding` and the identity's faces made by the loaded embedder."""
    (similarity,) = await runtime.identity_similarity(identity_id, embedding[None, :])  # 404 when absent
    if np.isnan(similarity):  # nothing to compare with: say why
        identity = await runtime.in_gallery(runtime.gallery.get_identity, identity_id)
        if identity.foreign_face_count:
            raise ModelMismatch(
                f"identity {identity_id!r} only has faces made by another embedder; re-enrol it",
                details={"identity_id": identity_id, "foreign_faces": identity.foreign_face_count},
            )
        raise Conflict(f"identity {identity_id!r} has no faces", details={"identity_id": identity_id})
    return float(similarity)


@router.post(
    "/verify",
    response_model=VerifyResponse,
    summary="Are two faces the same person?",
    description=(
        "Compares the largest face (or the face chosen with `face1`/`face2`, in /detect order) of `image1` "
        "with that of `image2`, or with the enrolled identity `identity_id` (its template: the normalised mean of its faces). "
        "`match` is `similarity >= threshold`. An image without a face is 422 `no_face`, naming the image."
    ),
    responses=error_responses(404, 409),
    openapi_extra=openapi_body(
        VerifyOptions, images=("image1", "image2"), required=("image1",), exactly_one_of=("image2", "identity_id")
    ),
)
async def verify(request: Request, runtime: RuntimeDep) -> VerifyResponse:
    async with read_request(
        request, VerifyOptions, images=("image1", "image2"), required=("image1",),
        max_image_bytes=runtime.settings.max_image_bytes,
    ) as body:
        options = body.options
        second = body.one("image2")
        if (second is None) == (options.identity_id is None):
            raise InvalidParameter("send exactly one of image2 and identity_id", details={"field": "image2"})
        if second is None and options.face2 is not None:
            raise InvalidParameter("face2 needs image2", details={"field": "face2"})
        if options.identity_id is not None:  # fail fast on an unknown identity, before any inference
            await runtime.in_gallery(runtime.gallery.get_identity, options.identity_id)

        jobs = [_chosen_face(runtime, body.one("image1"), options, options.face1)]
        if second is not None:
            jobs.append(_chosen_face(runtime, second, options, options.face2))
        # Both images in flight at once (they overlap when FACE_INFERENCE_WORKERS > 1); errors are raised in
        # image order, so a request with two bad images always reports image1.
        async with runtime.admitted(body.one("image1"), second):
            results = await asyncio.gather(*jobs, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    face1, index1, count1 = results[0]
    face2 = None
    if second is not None:
        face2, index2, count2 = results[1]
        similarity = float(vectors.similarity(face1.embedding, face2.embedding))
    else:
        similarity = await _identity_similarity(runtime, options.identity_id, face1.embedding)
    threshold = runtime.threshold if options.threshold is None else options.threshold
    return VerifyResponse(
        match=similarity >= threshold,
        similarity=similarity,
        threshold=threshold,
        face1=VerifiedFace(**face_out(face1).model_dump(), index=index1, faces_found=count1),
        face2=None if face2 is None else VerifiedFace(
            **face_out(face2).model_dump(), index=index2, faces_found=count2
        ),
        identity_id=options.identity_id,
    )


@router.post(
    "/identify",
    response_model=IdentifyResponse,
    summary="Who is in this image?",
    description=(
        "For every face: up to `top_k` enrolled identities whose similarity is at or above the threshold, "
        "best first. An empty `matches` list means nobody we know (never the nearest stranger). The threshold "
        "rises with the number of enrolled identities so that a stranger is named with at most the target "
        "probability (FACE_IDENTIFY_FPIR, default 1 %); `decision` states the threshold, the gallery size it was "
        "set for and the expected FPIR. A `threshold` option overrides it."
    ),
    openapi_extra=openapi_body(IdentifyOptions, images=("image",), required=("image",)),
)
async def identify(request: Request, runtime: RuntimeDep) -> IdentifyResponse:
    async with (
        read_request(
            request, IdentifyOptions, images=("image",), required=("image",),
            max_image_bytes=runtime.settings.max_image_bytes,
        ) as body,
        runtime.admitted(body.one("image")),
    ):
        options = body.options
        image = await runtime.decode(body.one("image"))
        info = image_info(image)
        faces = await runtime.faces(image, options, embed=True, max_faces=options.max_faces)
        del image  # the search below needs only the embeddings
    embeddings = np.stack([f.embedding for f in faces]) if faces else np.zeros((0, runtime.embedder.embedding_size))
    decision, results = await runtime.identify(embeddings, options.top_k, options.threshold)
    return IdentifyResponse(
        image=info,
        threshold=decision.threshold,
        decision=IdentifyDecision(**asdict(decision)),
        faces=[
            IdentifiedFace(
                **face_out(face).model_dump(),
                matches=[
                    IdentityMatch(
                        identity_id=m.identity_id, similarity=m.similarity, faces=m.faces, display_name=m.display_name
                    )
                    for m in matches
                ],
            )
            for face, matches in zip(faces, results)
        ],
    )
