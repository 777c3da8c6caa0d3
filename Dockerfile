# syntax=docker/dockerfile:1
# The fathom image: one binary for every role (`fathom coordinator`, `fathom worker`, the CLI).
#   docker build -t REGISTRY/fathom:TAG .
# Stage 1 builds the binary; stage 2 is the NVIDIA CUDA runtime (CUDA 13, Ubuntu 24.04) with NCCL.
# cudarc loads libcuda, libnvrtc, libcublas(Lt) and libnccl with dlopen at run time, so the
# binary links only glibc and builds without CUDA; it dlopens `libnccl.so` (not `.so.2`), which
# only the -dev package would provide: the runtime stage makes that link itself.

ARG RUST_VERSION=1.95
ARG CUDA_VERSION=13.0.0

FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin fathom \
 && install -m 0755 target/release/fathom /usr/local/bin/fathom

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
# libnccl2 (usually already in the runtime image; installed when not), then the libnccl.so link.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnccl2 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && nccl="$(dpkg -L libnccl2 | grep -E '/libnccl\.so\.2$' | head -n 1)" \
 && test -n "$nccl" \
 && ln -sf libnccl.so.2 "$(dirname "$nccl")/libnccl.so" \
 && ldconfig \
 && ldconfig -p | grep -q 'libnccl\.so '
# Non-root; uid/gid 10001 match the chart's podSecurityContext.
RUN groupadd --system --gid 10001 fathom \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/fathom --create-home \
      --shell /usr/sbin/nologin fathom \
 && install -d -o 10001 -g 10001 /var/cache/fathom
COPY --from=build /usr/local/bin/fathom /usr/local/bin/fathom
# NVLink multicast stays off (the chart sets it too). Kernel cache (NVRTC output) under
# XDG_CACHE_HOME; the chart mounts an emptyDir there because the root filesystem is read-only.
ENV NCCL_NVLS_ENABLE=0 \
    XDG_CACHE_HOME=/var/cache/fathom \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /home/fathom
ENTRYPOINT ["/usr/local/bin/fathom"]
CMD ["--help"]
