"""Tools around the pipeline, not parts of it: the bundled sample set and the benchmark."""
