"""Data side: image preprocessing, prompt templates, datasets."""
