"""Flag-free study functions: config in, results dict and files out."""
