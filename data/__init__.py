"""Data formats, loading and validation, and the bundled default datasets."""
