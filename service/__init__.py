"""The recommendation service: FAISS retrieval, the SQLite history store and the REST API over
exported artifacts (``python -m service index|serve``)."""
