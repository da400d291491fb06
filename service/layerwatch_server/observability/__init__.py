"""Prometheus exposition: the latest statistics of live runs and the collector's own health."""
