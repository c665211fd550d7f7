"""The web pages (``pages.py``), their templates and static files."""
