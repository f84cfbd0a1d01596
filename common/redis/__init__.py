"""Redis clients: connections, URLs (Sentinel), replicated writes, retry."""
