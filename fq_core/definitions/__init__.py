"""Definitions: what every measurement is parameterized by (settings and their defaults, the
number formats); below storage, since records and caches take their defaults from here."""
