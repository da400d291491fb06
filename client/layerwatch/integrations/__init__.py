"""Framework integrations: ``layerwatch.integrations.lightning`` and ``layerwatch.integrations.transformers``.

Each module imports its framework when it is imported itself; nothing here is imported by ``import layerwatch``.
"""
