"""sp2ot web service: a FastAPI app over the SP2OT clustering engine (see app.main)."""

__version__ = "0.1.0"
