"""sp2ot: the Python client of the sp2ot web service (:mod:`sp2ot.client`). The engine is
``sp2ot_engine``, the service ``app``; this package imports neither."""
