# The three images, from one multi-stage build that compiles the workspace once:
#   docker build --target operator -t mantle/operator:dev .
#   docker build --target router   -t mantle/router:dev .
#   docker build --target runner   -t mantle/runner:dev .
#   docker build --target batch    -t mantle/batch:dev .
#   docker build --target runner-cuda --build-arg CUDA_COMPUTE_CAP=90 -t mantle/runner-cuda:dev .
# Each final image is distroless (glibc, CA certificates, no shell) and runs as the non-root
# user 65532 — the UID the chart's pod security contexts and the runner pods' cache expect.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin mantle-operator --bin mantle-router --bin mantle-runner --bin mantle-batch \
 && mkdir -p /out \
 && cp target/release/mantle-operator target/release/mantle-router target/release/mantle-runner target/release/mantle-batch /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /out/mantle-operator /usr/local/bin/mantle-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mantle-operator"]

FROM gcr.io/distroless/cc-debian12:nonroot AS router
COPY --from=build /out/mantle-router /usr/local/bin/mantle-router
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mantle-router"]

# BatchJob worker pods: `mantle-batch run --batch-job NAME --workers N` (the operator's Job).
FROM gcr.io/distroless/cc-debian12:nonroot AS batch
COPY --from=build /out/mantle-batch /usr/local/bin/mantle-batch
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mantle-batch"]

# The runner pods' containers run `mantle-runner prepare-cache | fetch | serve …` (the operator
# passes the subcommand as the arguments).
FROM gcr.io/distroless/cc-debian12:nonroot AS runner
COPY --from=build /out/mantle-runner /usr/local/bin/mantle-runner
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mantle-runner"]

# The runner built with CUDA, for builtin-engine models on GPU nodes (`--device=cuda`, which the
# operator passes when a FoundationModel asks for GPUs). candle's kernels are compiled for
# CUDA_COMPUTE_CAP (90: Hopper; 89: Ada; 80: Ampere). The node's NVIDIA container toolkit
# provides the driver; this image brings the CUDA runtime libraries (cuBLAS, cuRAND).
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04 AS build-cuda
ARG CUDA_COMPUTE_CAP=90
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} PATH=/root/.cargo/bin:${PATH}
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl gcc g++ pkg-config \
 && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mantle-runner --features cuda \
 && mkdir -p /out && cp target/release/mantle-runner /out/

FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04 AS runner-cuda
COPY --from=build-cuda /out/mantle-runner /usr/local/bin/mantle-runner
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mantle-runner"]
