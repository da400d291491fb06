"""Alert rules: definitions (``spec``), per-step evaluation (``evaluate``), the alert lifecycle
(``lifecycle``), and their place in ingest and the scheduler (``service``; wired to notify by ``api.alerting``)."""
