"""The cache's file tier: one authenticated file per key under a checked directory."""
