"""Orthanc side of orthanc-ai: entry script, adapter, job queue, workers, REST routes.

Only ``plugin/adapter.py`` imports ``orthanc`` (``plugin/entry.py`` loads it).
"""
