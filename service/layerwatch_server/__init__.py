"""layerwatch collector: receives per-layer training statistics from layerwatch clients and serves
them back. Entry points: ``layerwatch-server`` (:mod:`layerwatch_server.cli`) and
:func:`layerwatch_server.app.create_app`."""
