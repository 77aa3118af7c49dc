"""Release engineering: the built distributions, the installed wheel, the lock files."""
