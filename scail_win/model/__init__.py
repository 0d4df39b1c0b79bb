"""Building SCAIL's model: its spec, loading and placement, lazy init, step cache and VAE tiling."""
