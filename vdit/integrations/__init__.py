"""Optional integrations of vdit with other libraries (each imports its library lazily)."""
