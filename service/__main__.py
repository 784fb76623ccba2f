"""`python -m service`: serve the API with uvicorn on HOST:PORT (settings from the environment, see README)."""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.gallery import GallerySetupError, check_gallery
from service.settings import Settings


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:  # a readable refusal, not a traceback, for a bad environment
        print(f"invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:  # an unreachable database or one without pgvector is a configuration error too: say so, exit 2
        check_gallery(settings.gallery_url, timeout_s=settings.gallery_timeout_s)
    except GallerySetupError as exc:
        print(f"invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    # One process per SQLite gallery: it owns the file and its in-memory search matrix (a second process would
    # not see the first one's enrolments); a PostgreSQL gallery takes any number of replicas. Concurrency comes
    # from FACE_INFERENCE_WORKERS threads, since ONNX Runtime and OpenCV release the GIL while they compute.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # Bodies are bounded by BodyLimitMiddleware; keep-alive connections idle out quickly.
        timeout_keep_alive=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
