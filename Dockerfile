# The control-plane image: the operator (`python -m agentbox.operator`) and the API
# (`python -m agentbox.api`), plus the migrations the chart's pre-install Job applies.
# PYTHON_IMAGE: any Python 3.11 image with pip; `make images` passes a local Debian base (no registry).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY crds crds
COPY operator operator
COPY api api
COPY sandbox sandbox
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 AGENTBOX_MIGRATIONS_DIR=/opt/agentbox/migrations
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY migrations /opt/agentbox/migrations
USER 65532:65532
ENTRYPOINT []
CMD ["python", "-m", "agentbox.api"]
