"""What every section shares: user-facing errors, hashing, atomic writes, metrics files."""
