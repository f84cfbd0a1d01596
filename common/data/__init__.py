"""Prompt datasets: reading them, uploads, the data-access policy, the http(s) guard."""
