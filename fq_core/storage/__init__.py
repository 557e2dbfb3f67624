"""Storage: the typed record, the identity a number depends on, the results store, the verified
cache and the history of runs. It never measures."""
