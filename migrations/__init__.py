"""Atlas migrations, shipped in the wheel as ``atlasengine._migrations``.

``layout/`` holds the steps between atlas formats (run by :mod:`atlasengine.api.upgrade`),
``duckdb/`` the numbered SQL migrations of the drift database (:mod:`atlasengine.drift.db`).
"""
