"""The worker process: Celery tasks, the worker API client, telemetry, launching (multi-GPU) attempts."""
