"""The built-in world (placeholder until it lands)."""
