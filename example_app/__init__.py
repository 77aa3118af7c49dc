"""Example FastAPI app of zeal-asgi: ``zeal-asgi run example_app.main:app --workers 2``."""
