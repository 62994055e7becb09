"""The teacher scoring service: FastAPI routes (app.py) over a Scorer backend (backends/), fed by a micro-batcher."""
