"""ASGI apps that the contract tests run as real server processes."""
