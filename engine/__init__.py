"""The analysis engine: worker processes beside Orthanc, job stores, the CLI."""
