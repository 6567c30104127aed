"""Tools around the product (synthetic data, training, evaluation); not part of what serves."""
