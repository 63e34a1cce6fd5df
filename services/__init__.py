"""The policy inference service (Ray Serve) and the public HTTP act API."""
