"""Celery worker of the sp2ot service: a thin layer over ``sp2ot_engine.SP2OTClustering``."""
