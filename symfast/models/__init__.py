"""Models from the seed papers built on symfast ops."""
