"""The ``atlasengine`` command line (entry point: :func:`atlasengine.cli.main.main`)."""
