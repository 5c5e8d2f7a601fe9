"""The recipe: its schema (the single home of defaults), loading with overrides, and validation."""
