"""Datasets for training the demo model."""
