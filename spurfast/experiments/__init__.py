"""End-to-end studies built from the library: train, score, localize, intervene, report."""
