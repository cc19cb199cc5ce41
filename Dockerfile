# Build stage: a wheel-installed virtualenv, so the runtime image carries no compilers.
# gcc compiles the gateway's hot path with mypyc (setup.py); without it the build warns
# and installs the same code uncompiled.
FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python -m venv /opt/metergate
COPY pyproject.toml setup.py README.md ./
COPY gateway ./gateway
COPY admin ./admin
COPY config ./config
COPY loadtests ./loadtests
RUN /opt/metergate/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/metergate/bin/pip install --no-cache-dir .

# Runtime stage: non-root, the gateway by default, health checked on /healthz.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /app metergate
WORKDIR /app
COPY --from=build /opt/metergate /opt/metergate
COPY gateway.toml /app/gateway.toml
ENV PATH="/opt/metergate/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    METERGATE_CONFIG=/app/gateway.toml \
    METERGATE_GATEWAY_LISTEN=0.0.0.0:8080 \
    METERGATE_ADMIN_LISTEN=0.0.0.0:8081
USER metergate
EXPOSE 8080 8081
# Follows METERGATE_GATEWAY_LISTEN, so a moved port is still checked.
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
  CMD python -c "import os,sys,urllib.request; port=os.environ.get('METERGATE_GATEWAY_LISTEN','0.0.0.0:8080').rpartition(':')[2]; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status == 200 else 1)"
CMD ["metergate", "gateway"]
