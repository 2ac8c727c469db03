"""vdit's test suite: a package, so that its folders (kernels, ops, nn, ...) never shadow installed modules."""
