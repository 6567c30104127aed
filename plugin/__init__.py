"""Orthanc side of orthanc-ai: entry script, adapter, job queue, workers, REST routes.

Only ``plugin/entry.py`` and ``plugin/adapter.py`` import ``orthanc``.
"""
