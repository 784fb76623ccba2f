"""Gallery endpoints: /enroll and the management of enrolled identities."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Path, Query, Request

from service.api.runtime import Runtime, RuntimeDep
from service.api.schemas import (
    Deleted,
    EnrolledFace,
    EnrollOptions,
    EnrollResponse,
    IdentityDetail,
    IdentityId,
    IdentityPage,
    IdentitySummary,
    PageOptions,
    StoredFace,
    error_responses,
    face_out,
)
from service.api.uploads import ImageUpload, openapi_body, read_request
from service.errors import FaceServiceError, InvalidParameter, NoFace, TooManyFaces
from service.gallery import servable
from service.pipeline import Face, largest
from service.quality import refuse_poor_face
from service.security import require_api_key

router = APIRouter(
    tags=["gallery"],
    dependencies=[Depends(require_api_key)],
    responses=error_responses(401, 422, 503),
)

IdentityPath = Annotated[IdentityId, Path(description="The identity's id.")]
FaceIdPath = Annotated[
    str, Path(description="A face id returned by /enroll.", pattern=r"^[A-Za-z0-9_-]{1,64}$")
]


def _time(unix_seconds: float) -> datetime:
    return datetime.fromtimestamp(unix_seconds, tz=timezone.utc)


async def _enrollable_face(runtime: Runtime, upload: ImageUpload, options: EnrollOptions) -> Face:
    async with runtime.admitted(upload):  # one image at a time: an enrolment holds one decoded image
        return await _largest_enrollable_face(runtime, upload, options)


async def _largest_enrollable_face(runtime: Runtime, upload: ImageUpload, options: EnrollOptions) -> Face:
    def choose(faces: list[Face]) -> list[Face]:
        if not faces:
            raise NoFace(f"images[{upload.index}]: no face found", details=upload.describe())
        if len(faces) > 1 and options.multiple_faces == "reject":
            raise TooManyFaces(
                f"images[{upload.index}]: {len(faces)} faces found; send a photo of one person, or set "
                "multiple_faces=largest",
                details={**upload.describe(), "faces_found": len(faces)},
            )
        return [largest(faces)]

    _, _, (face,) = await runtime.decode_chosen_faces(upload, options, choose, quality=True)
    if options.check_quality:
        minimums = runtime.settings.enroll_minimums
        if options.quality_minimums is not None:  # this enrolment's own, where given
            minimums = dataclasses.replace(minimums, **options.quality_minimums.model_dump(exclude_none=True))
        refuse_poor_face(face.quality, minimums)
    return face


@router.post(
    "/enroll",
    response_model=EnrollResponse,
    summary="Enrol face images under an identity",
    description=(
        "Adds one face per image in `images` to `identity_id`, creating the identity if new (a given "
        "`display_name` or `metadata` replaces the stored one). Each image must hold exactly one face; with "
        "`multiple_faces=largest` its largest face is used instead. If any image is rejected, nothing is "
        "stored: the error lists every rejected image (`details.rejected`: index, filename, code, reason). "
        "The enrolment is one database transaction, committed to disk before the response. Instead of images, "
        "`embeddings` (from /embed, or from another instance of the same model, with their `model_sha256`) "
        "enrol those vectors as they are."
    ),
    responses=error_responses(400, 409, 413, 415),
    openapi_extra=openapi_body(EnrollOptions, list_field="images", exactly_one_of=("images", "embeddings")),
)
async def enroll(request: Request, runtime: RuntimeDep) -> EnrollResponse:
    settings = runtime.settings
    async with read_request(
        request, EnrollOptions, list_field="images", repeatable=("embeddings",),
        max_images=settings.max_enroll_images, max_image_bytes=settings.max_image_bytes,
    ) as body:
        options = body.options
        uploads = body.images.get("images", [])
        if bool(uploads) == (options.embeddings is not None):
            raise InvalidParameter("send exactly one of images and embeddings", details={"field": "images"})
        if options.embeddings is not None:
            embeddings = await runtime.infer(
                runtime.client_embeddings, options.embeddings, options.model_sha256, "embeddings"
            )
            sources = [{"embedding_index": i} for i in range(len(embeddings))]
        else:
            if options.model_sha256 is not None:
                raise InvalidParameter("model_sha256 goes with embeddings", details={"field": "model_sha256"})
            embeddings, sources = await _enrollable_faces(runtime, uploads, options)

    face_ids = await runtime.in_gallery(
        runtime.gallery.enroll,
        options.identity_id,
        embeddings,
        options.display_name,
        options.metadata,
        sources=sources,
    )
    identity = await runtime.in_gallery(runtime.gallery.get_identity, options.identity_id)
    await runtime.refresh_gallery_gauge()
    return EnrollResponse(
        identity_id=identity.identity_id,
        display_name=identity.display_name,
        faces=[EnrolledFace(face_id=face_id, **source) for face_id, source in zip(face_ids, sources)],
        face_ids=face_ids,
        face_count=identity.face_count,
    )


async def _enrollable_faces(
    runtime: Runtime, uploads: list[ImageUpload], options: EnrollOptions
) -> tuple[np.ndarray, list[dict]]:
    """One embedded face per image, and where each came from; every image is checked, so that one refusal
    names all the bad ones, and nothing is enrolled unless all pass."""
    faces: list[Face] = []
    rejected: list[tuple[ImageUpload, FaceServiceError]] = []
    for upload in uploads:
        try:
            faces.append(await _enrollable_face(runtime, upload, options))
        except FaceServiceError as exc:
            # Kept for the answer, without its traceback: its frames hold that image's bytes, and ten
            # refused 20 MiB images would otherwise all stay in memory until the response.
            rejected.append((upload, exc.with_traceback(None)))
    if rejected:
        # The first rejection sets code and status; the details list every rejected image.
        raise type(rejected[0][1])(
            f"{len(rejected)} of {len(uploads)} image(s) rejected, nothing enrolled: "
            + "; ".join(exc.message for _, exc in rejected),
            details={
                "rejected": [
                    {**upload.describe(), "code": exc.code, "reason": exc.message, **exc.details}
                    for upload, exc in rejected
                ]
            },
        )
    sources = [
        {"filename": u.filename, "image_index": u.index, "box": face_out(f).box, "score": round(float(f.score), 5),
         "quality": f.quality.as_dict()}
        for u, f in zip(uploads, faces)
    ]
    return np.stack([f.embedding for f in faces]), sources


def _summary(identity) -> dict:
    # servable(): rows stored before bad text was refused at the door are still returned (U+FFFD in place of
    # a lone surrogate), not a 500 on every page that holds them.
    return {
        "identity_id": identity.identity_id,
        "display_name": servable(identity.display_name),
        "metadata": servable(identity.metadata),
        "face_count": identity.face_count,
        "foreign_face_count": identity.foreign_face_count,
        "created_at": _time(identity.created_at),
    }


@router.get("/identities", response_model=IdentityPage, summary="List enrolled identities (ordered by id)")
async def list_identities(page: Annotated[PageOptions, Query()], runtime: RuntimeDep) -> IdentityPage:
    identities, total = await runtime.in_gallery(runtime.gallery.list_identities, page.offset, page.limit)
    return IdentityPage(
        items=[IdentitySummary(**_summary(i)) for i in identities],
        total=total,
        offset=page.offset,
        limit=page.limit,
    )


@router.get(
    "/identities/{identity_id}",
    response_model=IdentityDetail,
    summary="One identity with its faces",
    responses=error_responses(404),
)
async def get_identity(identity_id: IdentityPath, runtime: RuntimeDep) -> IdentityDetail:
    identity = await runtime.in_gallery(runtime.gallery.get_identity, identity_id)
    return IdentityDetail(
        **_summary(identity),
        faces=[
            StoredFace(
                face_id=f.face_id,
                created_at=_time(f.created_at),
                model_sha256=f.model_sha256,
                current_model=f.current_model,
                source=servable(f.source),
            )
            for f in identity.faces or []
        ],
    )


@router.delete(
    "/identities/{identity_id}",
    response_model=Deleted,
    summary="Delete an identity and all its faces (erased from disk)",
    responses=error_responses(404),
)
async def delete_identity(identity_id: IdentityPath, runtime: RuntimeDep) -> Deleted:
    count = await runtime.in_gallery(runtime.gallery.delete_identity, identity_id)
    await runtime.refresh_gallery_gauge()
    return Deleted(identity_id=identity_id, faces_deleted=count)


@router.delete(
    "/identities/{identity_id}/faces/{face_id}",
    response_model=Deleted,
    summary="Delete one face of an identity (the identity stays)",
    responses=error_responses(404),
)
async def delete_face(identity_id: IdentityPath, face_id: FaceIdPath, runtime: RuntimeDep) -> Deleted:
    await runtime.in_gallery(runtime.gallery.delete_face, identity_id, face_id)
    await runtime.refresh_gallery_gauge()
    return Deleted(identity_id=identity_id, face_id=face_id, faces_deleted=1)
