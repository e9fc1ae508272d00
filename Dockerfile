# medinv on CUDA: `docker build -t medinv .`, then for example
#   docker run --rm --gpus all medinv doctor
#   docker run --rm --gpus all --user "$(id -u):$(id -g)" -v "$PWD/cases:/data:ro" \
#       -v "$PWD/seg:/out" medinv segment /data --out /out
# torch comes with the base image (MONAI 1.6 needs torch>=2.8); the tag pins the CUDA build.
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MEDINV_DATA_DIR=/data/anatomy

# A fixed numeric user, above the range base images use, so that it never collides with one
# of theirs and orchestrators can check it is not root; `docker run --user` replaces it.
RUN useradd --no-log-init --create-home --uid 10001 --user-group medinv \
    && mkdir -p /data /out \
    && chown medinv:medinv /data /out

WORKDIR /opt/medinv
COPY pyproject.toml README.md ./
COPY scripts/install.sh ./scripts/
COPY medinv ./medinv
# The same recipe as `make install`; here a regular install on the base image's torch.
RUN sh scripts/install.sh python && medinv --help > /dev/null
# Training and inference recipes, for `--config /opt/medinv/configs/...`.
COPY configs ./configs

USER 10001:10001
WORKDIR /out
VOLUME ["/data", "/out"]

HEALTHCHECK --interval=5m --timeout=2m --start-period=1m \
    CMD ["sh", "-c", "medinv doctor > /dev/null || exit 1"]
ENTRYPOINT ["medinv"]
CMD ["--help"]
