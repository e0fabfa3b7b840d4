"""Tests of docker/: compose files through the real Compose binary, the loopback topology."""
