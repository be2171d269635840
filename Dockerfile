# GPU image for distill. Build: docker build -t distill .
# Run:   docker run --gpus all -v $PWD/data:/app/data -v $PWD/zoo:/app/zoo -v $PWD/outputs:/app/outputs \
#          distill python tools/train.py distiller=kd teacher=resnet56 student=resnet20
# The base image's CUDA runtime matches the pinned torch build's CUDA major version (13).
FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

WORKDIR /app
ENV PYTHONUNBUFFERED=1 \
    DISTILL_DATA=/app/data \
    DISTILL_ZOO=/app/zoo

# dependencies first, for layer caching; torch/torchvision already match the base image's pins
COPY pyproject.toml README.md ./
COPY distill ./distill
COPY hydra_plugins ./hydra_plugins
RUN pip install --no-cache-dir -e '.[dev]'
COPY configs ./configs
COPY tools ./tools
COPY tests ./tests

CMD ["python", "tools/train.py", "--help"]
