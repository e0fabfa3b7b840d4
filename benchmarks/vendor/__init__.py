"""Third-party model code, vendored verbatim with its licence (see each file's header)."""
