"""The worker's side of client-driven (Tinker) models: the op runner, sampling, chaining."""
