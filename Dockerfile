# One image for every callstream service; the command picks the service:
#   docker run IMAGE ingress
#   docker run IMAGE consumer storage      (or alerting, metrics)
# Health checks live in docker-compose.yml, next to the ports they probe.

# -- build: install callstream and its dependencies into a virtualenv ------------------------
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/callstream
ENV PATH="/opt/callstream/bin:$PATH"

WORKDIR /src
# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when they change.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip install -r requirements.txt
COPY core ./core
COPY callstream ./callstream
COPY ingress ./ingress
COPY consumers ./consumers
COPY schemas ./schemas
RUN pip install --no-deps . && pip check

# -- runtime --------------------------------------------------------------------------------
FROM python:3.11-slim

LABEL org.opencontainers.image.title="callstream" \
      org.opencontainers.image.description="Flireo call reports: aiohttp ingress, Avro on Kafka, consumers"

ENV PATH="/opt/callstream/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# A fixed, unprivileged uid/gid so mounted volumes get predictable ownership.
RUN groupadd --system --gid 10001 callstream \
    && useradd --system --uid 10001 --gid callstream --home-dir /var/lib/callstream \
       --shell /usr/sbin/nologin callstream \
    && mkdir -p /var/lib/callstream \
    && chown callstream:callstream /var/lib/callstream

COPY --from=build /opt/callstream /opt/callstream

# State that must outlive a container (SQLite ledgers, the alerting state) goes here; the
# relative defaults (.callstream/...) resolve under it too.
WORKDIR /var/lib/callstream
USER callstream:callstream

# ingress; storage, alerting and metrics /metrics + /healthz
EXPOSE 8080 9101 9102 9103

ENTRYPOINT ["callstream"]
CMD ["--help"]
