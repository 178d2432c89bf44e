# syntax=docker/dockerfile:1
# resumable-shim as a sidecar container: the same `python -m shim` the test suite runs, as a
# non-root user, with uploads in progress on the /data volume. README "In Docker" and
# compose.example.yaml show it beside a legacy server.
#
#   docker build -t resumable-shim .
#   docker run -e LEGACY_URL=http://legacy.internal:8080 -p 127.0.0.1:8000:8000 \
#       -v shim-data:/data resumable-shim

# Build stage: install the package (no test extras) into a virtualenv that the final stage
# copies, so neither the source nor pip's build leftovers end up in the image.
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shim/ shim/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check .

FROM python:3.12-slim
# A fixed numeric uid: Kubernetes' runAsNonRoot can check it, and a bind-mounted folder can be
# handed to it (chown 10001). /data belongs to it, so a new named volume does too.
RUN groupadd --system --gid 10001 shim \
 && useradd --system --uid 10001 --gid shim --home-dir /home/shim --create-home \
        --shell /usr/sbin/nologin shim \
 && mkdir -p /data /etc/shim \
 && chown shim:shim /data
COPY --from=build /opt/venv /opt/venv
COPY docker/shim.yaml /etc/shim/shim.yaml
# LEGACY_URL (the legacy server) has no default: the container refuses to start without it.
# SHIM_CONFIG, SHIM_LISTEN and SHIM_CONFDIR are the --config, --listen and --confdir of the
# command below. The listener must be 0.0.0.0 inside a container: a published port arrives on
# the container's own interface, not on its 127.0.0.1. mitmproxy's CA lives on the volume, so
# clients that trust it keep trusting it when the container is replaced. SHIM_ARGS: more flags
# (e.g. -q). SHIM_HEALTH_URL: what HEALTHCHECK asks; it must match the config's admin.listen.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SHIM_CONFIG=/etc/shim/shim.yaml \
    SHIM_LISTEN=0.0.0.0:8000 \
    SHIM_CONFDIR=/data/mitmproxy \
    SHIM_ARGS="" \
    SHIM_HEALTH_URL=http://127.0.0.1:9464/healthz
VOLUME /data
USER 10001:10001
WORKDIR /home/shim
EXPOSE 8000
# The admin listener's /healthz (admin.listen, default 127.0.0.1:9464, not published): any
# error, refusal or non-2xx answer raises, so python exits 1 = unhealthy. No proxy: an
# HTTP_PROXY set for the shim's own traffic must not carry the container's check elsewhere.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(os.environ['SHIM_HEALTH_URL'], timeout=4)"]
# A shell only to put the environment into the arguments; exec makes python PID 1, so
# `docker stop` (SIGTERM) reaches the shim, which finishes its work and exits 0.
CMD ["/bin/sh", "-c", "exec python -m shim --upstream \"${LEGACY_URL:?set LEGACY_URL to the legacy server, e.g. http://legacy:8080}\" --config \"$SHIM_CONFIG\" --listen \"$SHIM_LISTEN\" --confdir \"$SHIM_CONFDIR\" $SHIM_ARGS"]
