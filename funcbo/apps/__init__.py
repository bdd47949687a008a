"""Applications of funcbo: each imports the library, never the other way round."""
