"""Uploads: the streaming multipart form (:mod:`app.uploads.form`) and what is done with an
archive once it is on disk (:mod:`app.uploads.ingest`: checked by the engine's archive rules,
stored as it came with its manifest next to it, a truth CSV matched to its images).

The form's names are re-exported here (``from app.uploads import receive_multipart`` as before
the package existed)."""
from app.uploads.form import ReceivedFile, ReceivedForm, receive_multipart

__all__ = ["ReceivedFile", "ReceivedForm", "receive_multipart"]
