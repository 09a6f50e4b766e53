"""Operations: Prometheus metrics (``GET /metrics``), request ids and the log format (DELTAREG_LOG_FORMAT)."""
