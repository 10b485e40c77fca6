# One image for every haifctl daemon; the command picks the daemon (see docker-compose.yml).
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY haifctl ./haifctl
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 haif
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER haif
ENV HAIF_HOME=/home/haif/.haifctl \
    HAIF_METRICS_HOST=0.0.0.0 \
    OTEL_PROMETHEUS_PORT=9464 \
    PYTHONUNBUFFERED=1
EXPOSE 9464
ENTRYPOINT ["haifctl"]
CMD ["--help"]
