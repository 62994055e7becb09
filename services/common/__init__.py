"""Pieces every uniopd HTTP service shares: API keys, error bodies, body limits, request metrics."""
