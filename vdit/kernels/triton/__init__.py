"""Triton kernels. Importing a module here imports triton; ops import them lazily."""
