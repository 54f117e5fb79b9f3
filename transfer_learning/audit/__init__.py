"""The data audit on the cached features: label issues (out-of-fold probabilities, confident learning), near-copies
and leaks between splits, outliers, a 2-D map, contact sheets and reports/audit.md."""
