"""Uploads: the streaming multipart form (:mod:`app.uploads.form`) and what is done with an
archive once it is on disk (:mod:`app.uploads.ingest`: checked by the engine's archive rules,
stored as it came with its manifest next to it, a truth CSV matched to its images)."""
