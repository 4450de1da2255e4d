# mim on a CUDA runtime image: a Python venv with the pinned torch pair, mim and its pinned dependencies
# (constraints.txt) with the video, tables and scale (wandb) extras, and DeepSpeed. The torch wheels bring their own
# CUDA 13.0 runtime libraries, so the host needs an NVIDIA driver that supports CUDA 13 and the NVIDIA Container
# Toolkit; nothing is compiled (DeepSpeed's C++/CUDA ops are not built: mim uses torch's AdamW).
#
#   docker build -t mim .
#   docker run --gpus all --ipc=host -v /data:/data -v "$PWD/runs:/work/runs" mim \
#       fit -c recipes/mae/vit_b16_in1k.yaml -c recipes/_base/deepspeed_stage_2.yaml \
#       --data.init_args.root /data/imagenet/train
#
# --ipc=host (or --shm-size=16g) gives the DataLoader workers enough shared memory. More in docs/scale_out.md.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DS_BUILD_OPS=0

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --shell /bin/bash --uid 1001 mim

WORKDIR /work

# Heavy, rarely changing layers first: the torch pair (pinned together: a mismatched torchvision lacks its
# operators), then DeepSpeed (an sdist that imports torch while it installs).
COPY constraints.txt ./
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 \
    && pip install --no-cache-dir -c constraints.txt deepspeed==0.19.8

COPY setup.cfg pyproject.toml ./
COPY mim ./mim
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -c constraints.txt ".[video,tables,scale]"

COPY recipes ./recipes
COPY launch ./launch
COPY benchmarks ./benchmarks
RUN mkdir -p runs && chown -R 1001:1001 /work

USER 1001
ENTRYPOINT ["mim"]
CMD ["--help"]
