"""The Redis store: the only package that imports redis."""
