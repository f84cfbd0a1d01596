"""Client-driven (Tinker) models: the op store and its Lua scripts, the closed set of loss names."""
