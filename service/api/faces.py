"""Face endpoints: /detect, /embed, /verify, /identify."""

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
    EmbeddedFace,
    EmbeddedImage,
    EmbedOptions,
    EmbedResponse,
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
from service.gallery import Match
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
        image, faces = await runtime.decode_faces(
            body.one("image"), body.options, embed=False, max_faces=body.options.max_faces
        )
        return DetectResponse(image=image_info(image), faces=[face_out(f) for f in faces])


async def _chosen_face(
    runtime: Runtime, upload: ImageUpload, options: VerifyOptions, index: int | None
) -> tuple[Face, int, int]:
    """The face of one image to verify with: the requested index, or the largest; embedded."""

    def choose(faces: list[Face]) -> list[Face]:
        if not faces:
            raise NoFace(f"no face found in {upload.field}", details=upload.describe())
        if index is not None and index >= len(faces):
            raise InvalidParameter(
                f"{upload.field} has {len(faces)} face(s); face index {index} does not exist",
                details={**upload.describe(), "faces_found": len(faces), "face_index": index},
            )
        return [largest(faces) if index is None else faces[index]]

    _, faces, (face,) = await runtime.decode_chosen_faces(upload, options, choose)
    return face, next(i for i, f in enumerate(faces) if f is face), len(faces)


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
    "/embed",
    response_model=EmbedResponse,
    summary="Embeddings of the faces in one or more images",
    description=(
        "For each image in `images`, in order: its largest face (or `faces=all`: every face, best score first, "
        "at most `max_faces`) with box, score, landmarks and its L2-normalised embedding, as JSON numbers or "
        "(`format=base64`) base64 of little-endian float32. The cosine similarity of two embeddings (their dot "
        "product) is what /verify compares with `threshold`. Keep `model_sha256` with them: embeddings of "
        "another model are not comparable, and /verify (`embedding2`), /identify (`candidates`) and /enroll "
        "(`embeddings`) refuse them. An image without a face gives an empty `faces` list. Nothing is stored."
    ),
    responses=error_responses(413),
    openapi_extra=openapi_body(EmbedOptions, list_field="images", required=("images",)),
)
async def embed(request: Request, runtime: RuntimeDep) -> EmbedResponse:
    settings = runtime.settings
    async with read_request(
        request, EmbedOptions, list_field="images", required=("images",),
        max_images=settings.max_enroll_images, max_image_bytes=settings.max_image_bytes,
    ) as body:
        options = body.options
        found: list[tuple[ImageUpload, ImageInfo, list[Face]]] = []
        for upload in body.images["images"]:
            # One decoded image at a time, its faces embedded before the next is decoded. Not one embedder batch
            # across images: measured (benchmarks/embed_batching.py, BENCHMARKS.md), a batch of N crops costs
            # more per face than N calls of one on ONNX Runtime's CPU provider, so batching would only add memory.
            async with runtime.admitted(upload):
                # One trip to a worker each way: every face embedded, or the largest chosen and only it embedded.
                if options.faces == "all":
                    image, faces = await runtime.decode_faces(
                        upload, options, embed=True, max_faces=options.max_faces, quality=options.quality
                    )
                else:
                    image, _, faces = await runtime.decode_chosen_faces(
                        upload, options, lambda faces: [largest(faces)] if faces else [], quality=options.quality
                    )
                found.append((upload, image_info(image), faces))
                del image
    encode = vectors.to_base64 if options.format == "base64" else (lambda v: [float(x) for x in v])
    return EmbedResponse(
        model_sha256=runtime.embedder.model_id,
        embedding_size=runtime.embedder.embedding_size,
        format=options.format,
        threshold=runtime.threshold,
        flip=runtime.embedder.flip,
        images=[
            EmbeddedImage(
                index=upload.index,
                filename=upload.filename,
                image=info,
                faces=[EmbeddedFace(**face_out(f).model_dump(), embedding=encode(f.embedding)) for f in faces],
            )
            for upload, info, faces in found
        ],
    )


@router.post(
    "/verify",
    response_model=VerifyResponse,
    summary="Are two faces the same person?",
    description=(
        "Compares the largest face (or the face chosen with `face1`/`face2`, in /detect order) of `image1` "
        "with that of `image2`, or with the enrolled identity `identity_id` (its template: the normalised mean of its faces), "
        "or with `embedding2`, an embedding the client kept from /embed (with its `model_sha256`; nothing is stored). "
        "`match` is `similarity >= threshold`. An image without a face is 422 `no_face`, naming the image."
    ),
    responses=error_responses(404, 409),
    openapi_extra=openapi_body(
        VerifyOptions, images=("image1", "image2"), required=("image1",),
        exactly_one_of=("image2", "identity_id", "embedding2"),
    ),
)
async def verify(request: Request, runtime: RuntimeDep) -> VerifyResponse:
    async with read_request(
        request, VerifyOptions, images=("image1", "image2"), required=("image1",),
        max_image_bytes=runtime.settings.max_image_bytes,
    ) as body:
        options = body.options
        second = body.one("image2")
        given = [name for name, value in (("image2", second), ("identity_id", options.identity_id),
                                          ("embedding2", options.embedding2)) if value is not None]
        if len(given) != 1:
            raise InvalidParameter(
                "send exactly one of image2, identity_id and embedding2", details={"field": "image2", "given": given}
            )
        if second is None and options.face2 is not None:
            raise InvalidParameter("face2 needs image2", details={"field": "face2"})
        held = None
        if options.embedding2 is not None:  # checked before any inference
            held = runtime.client_embeddings([options.embedding2], options.model_sha256, "embedding2", indexed=False)[0]
        elif options.model_sha256 is not None:
            raise InvalidParameter("model_sha256 goes with embedding2", details={"field": "model_sha256"})
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
    elif held is not None:
        similarity = float(vectors.similarity(face1.embedding, held))
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


async def _candidates(runtime: Runtime, options: IdentifyOptions) -> np.ndarray | None:
    """The client-held candidates' embeddings (C, D), or None to search the gallery."""
    if options.candidates is None:
        if options.model_sha256 is not None:
            raise InvalidParameter("model_sha256 goes with candidates", details={"field": "model_sha256"})
        return None
    limit = runtime.settings.max_candidates
    if len(options.candidates) > limit:
        raise InvalidParameter(
            f"at most {limit} candidates per request (FACE_MAX_CANDIDATES)",
            details={"field": "candidates", "max_candidates": limit},
        )
    ids = [c.id for c in options.candidates]
    if len(set(ids)) != len(ids):
        raise InvalidParameter("candidate ids must be unique", details={"field": "candidates"})
    values = [c.embedding for c in options.candidates]
    return await runtime.infer(runtime.client_embeddings, values, options.model_sha256, "candidates")


def _search_candidates(
    embeddings: np.ndarray, held: np.ndarray, candidates: list, top_k: int, threshold: float
) -> list[list[Match]]:
    """What the gallery's search does, over the candidates a request sent: per face, up to top_k at or above
    the threshold, best first (each candidate is one embedding: its own template)."""
    results = []
    for scores in np.atleast_2d(vectors.similarity(embeddings, held)) if len(embeddings) else []:
        above = np.flatnonzero(scores >= threshold)
        best = above[np.argsort(-scores[above], kind="stable")][:top_k]
        results.append([
            Match(identity_id=candidates[i].id, similarity=float(scores[i]), faces=1,
                  display_name=candidates[i].display_name)
            for i in best
        ])
    return results


@router.post(
    "/identify",
    response_model=IdentifyResponse,
    summary="Who is in this image?",
    description=(
        "For every face: up to `top_k` enrolled identities whose similarity is at or above the threshold, "
        "best first. An empty `matches` list means nobody we know (never the nearest stranger). The threshold "
        "rises with the number of enrolled identities so that a stranger is named with at most the target "
        "probability (FACE_IDENTIFY_FPIR, default 1 %); `decision` states the threshold, the gallery size it was "
        "set for and the expected FPIR. A `threshold` option overrides it. With `candidates` (embeddings the "
        "client holds, from /embed, and their `model_sha256`) those are searched instead of the gallery, under "
        "the same policy for their number; nothing is stored."
    ),
    responses=error_responses(409),
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
        held = await _candidates(runtime, options)  # checked before any inference
        image, faces = await runtime.decode_faces(body.one("image"), options, embed=True, max_faces=options.max_faces)
        info = image_info(image)
        del image  # the search below needs only the embeddings
    embeddings = np.stack([f.embedding for f in faces]) if faces else np.zeros((0, runtime.embedder.embedding_size))
    if held is None:
        decision, results = await runtime.identify(embeddings, options.top_k, options.threshold)
    else:
        decision = runtime.identify_policy.decide(len(options.candidates), options.threshold)
        results = _search_candidates(embeddings, held, options.candidates, options.top_k, decision.threshold)
    return IdentifyResponse(
        image=info,
        threshold=decision.threshold,
        decision=IdentifyDecision(**asdict(decision), searched="gallery" if held is None else "candidates"),
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
