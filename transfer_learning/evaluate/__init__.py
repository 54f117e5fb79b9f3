"""params `evaluate` (stage evaluate): scoring, the report and the run."""
