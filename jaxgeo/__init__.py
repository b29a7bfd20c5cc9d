"""jaxgeo: self-supervised and supervised learning on satellite imagery in JAX."""
