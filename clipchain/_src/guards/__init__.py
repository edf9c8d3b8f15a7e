"""Guards: wrappers that decide, inside the compiled step, whether an update is applied."""
