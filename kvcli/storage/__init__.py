"""Cache stores: directories and S3 through one interface, remote byte sources, and the `serve-cache` server."""
