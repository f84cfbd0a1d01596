"""Celery messages: config, the screening broker transport, dead letters, message bodies."""
