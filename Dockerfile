# The worker image of docker-compose.yml (CPU-only; torch's CPU wheels keep it small).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pymk pymk
COPY streams streams
COPY features features
COPY ranking ranking
COPY index index
COPY bench bench
COPY data data
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu .
EXPOSE 6066
CMD ["pymk", "worker"]
