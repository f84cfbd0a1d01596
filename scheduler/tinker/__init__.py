"""The scheduler's side of client-driven (Tinker) models: dispatch, capacity, leader ops."""
