"""Running Pagoda beyond one process: Ray Serve replicas (ray_serve.py)."""
