"""One module per figure; each ``measure`` returns its figures."""
