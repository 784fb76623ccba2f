"""Operational endpoints: /health (alive), /ready (can serve), /metrics (Prometheus), /models (what is loaded)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends, Request, Response

from service.api.runtime import NotReady, RuntimeDep
from service.api.schemas import (
    EmbedderInfo,
    FarTableInfo,
    GalleryInfo,
    Health,
    IdentifyDecision,
    IdentifyPolicyInfo,
    ModelInfo,
    ModelsResponse,
    Ready,
    error_responses,
)
from service.security import require_api_key

router = APIRouter(tags=["system"])


@router.get("/health", response_model=Health, summary="Liveness: the process answers")
async def health() -> Health:
    return Health()


@router.get(
    "/ready",
    response_model=Ready,
    summary="Readiness: models loaded and gallery open",
    responses=error_responses(503),
)
async def ready(request: Request) -> Ready:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise NotReady("models are not loaded")
    try:  # a query proves the database is still open and readable, not just that it once was
        await runtime.in_gallery(runtime.gallery.count_identities)
        faces = await runtime.in_gallery(runtime.gallery.count_faces)
    except Exception as exc:
        raise NotReady(f"the gallery is not readable: {exc}") from exc
    return Ready(
        detector=runtime.settings.detector_path.name,
        embedder=runtime.settings.embedder_path.name,
        gallery_faces=faces,
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Request counts and latencies per endpoint; time per stage (decode, detect, align, embed, "
    "search). Text exposition format.",
    response_class=Response,
    dependencies=[Depends(require_api_key)],
    responses={200: {"content": {"text/plain": {}}}, **error_responses(401)},
)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics
    return Response(registry.render(), media_type=registry.content_type)


def _model_info(model, file: str) -> dict:
    meta = dict(model.metadata)
    size = getattr(model, "input_size", None)
    return {
        "file": file,
        "sha256": model.sha256,
        "kind": meta.get("face.kind", ""),
        "arch": meta.get("face.arch"),
        "input_size": list(size) if size else None,
        "metadata": meta,
    }


def _identify_info(runtime, searchable: int) -> IdentifyPolicyInfo:
    policy = runtime.identify_policy
    table = policy.table
    return IdentifyPolicyInfo(
        policy=policy.name,
        target_fpir=policy.target_fpir if policy.name == "fpir" else None,
        fixed_threshold=policy.fixed_threshold,
        floor_threshold=policy.verify_threshold,
        far_table=None if table is None else FarTableInfo(
            impostor_pairs=table.impostor_pairs,
            measured_to=table.measured_to,
            smallest_measured_far=table.smallest_measured_far,
            points=len(table.thresholds),
            rule=table.rule,
            extrapolation=table.extrapolation,
        ),
        warning=runtime.identify_warning,
        current=IdentifyDecision(**asdict(policy.decide(searchable))),
    )


@router.get(
    "/models",
    response_model=ModelsResponse,
    summary="The loaded models and the gallery they match against",
    dependencies=[Depends(require_api_key)],
    responses=error_responses(401, 503),
)
async def models(runtime: RuntimeDep) -> ModelsResponse:
    embedder = runtime.embedder
    gallery = runtime.gallery
    # Gallery calls run on its thread: they wait for its lock, which an enrolment holds through its fsync.
    identities = await runtime.in_gallery(gallery.count_identities)
    faces = await runtime.in_gallery(gallery.count_faces)
    foreign = await runtime.in_gallery(gallery.count_foreign)
    searchable = await runtime.in_gallery(gallery.count_searchable_identities)
    return ModelsResponse(
        detector=ModelInfo(**_model_info(runtime.detector, runtime.settings.detector_path.name)),
        embedder=EmbedderInfo(
            **_model_info(embedder, runtime.settings.embedder_path.name),
            model_id=embedder.model_id,
            embedding_size=embedder.embedding_size,
            threshold=runtime.threshold,
            threshold_source=runtime.threshold_source,
            flip=embedder.flip,
            identify=_identify_info(runtime, searchable),
        ),
        gallery=GalleryInfo(identities=identities, faces=faces, foreign_faces=foreign),
    )
