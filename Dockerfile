# The registry server (no torch: the server never needs it).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY pyproject.toml setup.py README.md alembic.ini ./
COPY registry ./registry
COPY client ./client
COPY migrations ./migrations
RUN pip install ".[server]" && useradd --create-home --uid 10001 deltareg

USER deltareg
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["deltareg", "serve", "--host", "0.0.0.0", "--port", "8000"]
