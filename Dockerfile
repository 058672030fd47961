# Build: docker build -t proto_tasker .
# Run:   docker run -p 8080:8080 -e PROTO_TASKER_TOKEN=change-me proto_tasker
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Compiled into the binary: the dashboard's template, script and style.
COPY templates ./templates
COPY assets ./assets
COPY benches ./benches
COPY examples ./examples
RUN cargo build --release --locked --bin proto_tasker

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/proto_tasker --create-home proto_tasker
COPY --from=build /src/target/release/proto_tasker /usr/local/bin/proto_tasker
COPY deploy/config.yaml /etc/proto_tasker/config.yaml
USER proto_tasker
WORKDIR /var/lib/proto_tasker
EXPOSE 8080
# Ready when the node answers and its store does (tests/deploy.rs checks
# that this, the port, the user and the paths match deploy/config.yaml).
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/proto_tasker", "health", "--server", "http://127.0.0.1:8080"]
ENTRYPOINT ["/usr/local/bin/proto_tasker"]
CMD ["--config=/etc/proto_tasker/config.yaml"]
