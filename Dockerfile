# segnext-backend: SegNext interactive segmentation for Label Studio.
#   docker build -t segnext-backend .                                  (CPU)
#   docker build -t segnext-backend:gpu --build-arg DEVICE=auto .      (GPU: onnxruntime-gpu with CUDA and cuDNN)
#   docker build -t segnext-backend:openvino --build-arg DEVICE=openvino .   (CPU, OpenVINO: bf16 where the CPU has it)
# DEVICE is also the image's default setting: `auto` uses the GPU when it works and says why not otherwise,
# `cuda` refuses to start without it (README.md, "GPU"). Run GPU images with `docker run --gpus all`.
# The model files are not in the image: they live in the /models volume and are downloaded there at the
# first start (or put there by hand, see README.md). The image runs as uid 1000, which must be able to write
# to /models for the download.
FROM python:3.11-slim

ARG DEVICE=cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VENV=/opt/venv \
    MODEL_DIR=/models \
    PORT=9090 \
    DEVICE=${DEVICE}

WORKDIR /app
RUN useradd --create-home --uid 1000 segnext \
    && mkdir -p /models \
    && chown segnext:segnext /models

# The same install steps as scripts/install.sh (which tests/test_deploy.py runs in a clean virtual environment).
COPY requirements.txt requirements-no-deps.txt requirements-gpu.txt requirements-openvino.txt ./
COPY scripts/install.sh scripts/install.sh
RUN case "$DEVICE" in cpu|cuda|auto|openvino) ;; *) echo "DEVICE=$DEVICE: use cpu, cuda, auto or openvino" >&2; exit 1;; esac
RUN bash scripts/install.sh \
    && if [ "$DEVICE" = "openvino" ]; then \
         /opt/venv/bin/pip uninstall --yes onnxruntime \
         && /opt/venv/bin/pip install -r requirements-openvino.txt; \
       elif [ "$DEVICE" != "cpu" ]; then \
         /opt/venv/bin/pip uninstall --yes onnxruntime \
         && /opt/venv/bin/pip install -r requirements-gpu.txt; \
       fi

COPY . .
USER segnext
VOLUME ["/models"]
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["/opt/venv/bin/python", "_wsgi.py", "--health-check"]
CMD ["/opt/venv/bin/gunicorn", "-c", "gunicorn.conf.py"]
