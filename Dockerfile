# medinv on CUDA: `docker build -t medinv .`, then for example
#   docker run --gpus all -v "$PWD/scans:/data" -v "$PWD/out:/out" medinv doctor
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MEDINV_DATA_DIR=/data/anatomy

RUN useradd --create-home --uid 1000 medinv \
    && mkdir -p /data /out \
    && chown medinv:medinv /data /out

WORKDIR /opt/medinv
COPY pyproject.toml README.md ./
COPY medinv ./medinv
# torch comes with the base image and satisfies the package's torch requirement.
RUN pip install . && medinv --help > /dev/null

USER medinv
WORKDIR /out
VOLUME ["/data", "/out"]

HEALTHCHECK CMD medinv doctor || exit 1
ENTRYPOINT ["medinv"]
CMD ["--help"]
