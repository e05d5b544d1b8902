"""Persistence of an atlas: layout and commits, manifest, cell store, checkpoints, versions, write lock."""
