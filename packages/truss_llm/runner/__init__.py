"""The local runner: Baseten's endpoint surface in front of the real truss server."""
