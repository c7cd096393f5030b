"""Sample quality: a feature network of the data (classifier) and the metrics on its features (metrics)."""
