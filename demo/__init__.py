"""``make demo``: an application of the project, not part of it: train a model, serve it with
``python -m service serve`` and query the API (``python -m demo``, ``python -m demo.client``)."""
