"""The live demo page (/demo): webcam -> WebSocket /stream -> boxes and names over the video.

Plain HTML, JavaScript and CSS shipped in the package (service/web/), nothing from a CDN, so it works offline.
The page itself is public: a browser sends no key when it opens a page, and it holds nothing secret; what it
does (the stream, enrolment) needs the key like any client, which the page asks for when the server says 4401.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
ASSETS_URL = "/demo/assets"

router = APIRouter(include_in_schema=False)


@router.get("/demo")
async def demo() -> FileResponse:
    # no-cache: a page from an older version must not talk to a newer server with its old script
    return FileResponse(WEB_DIR / "demo.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


def demo_assets() -> StaticFiles:
    return StaticFiles(directory=WEB_DIR)
