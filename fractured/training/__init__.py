"""ML staff's tools: training, evaluation and building engine bundles."""
