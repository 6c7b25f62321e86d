"""Observability: metrics, flow events, the dashboards' snapshot models."""
