"""The test suite, mirroring the packages; shared process helpers in :mod:`tests.procs`."""
