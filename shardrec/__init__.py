"""The ``shardrec`` command: one entry point for training (``trainer``) and serving (``service``)."""
