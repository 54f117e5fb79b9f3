"""audit: data/features/{train,val,test}.h5 + data/prepared/manifest.csv -> reports/audit.md, reports/audit/ (the
lists as CSV, contact sheets, the map), plots/audit/map.csv, metrics/audit.json + reports/timings/audit.json.

Label issues (out-of-fold probabilities, confident learning), near-copies within and across splits, outliers and a
2-D map, on the cached features alone: seconds (transfer_learning/audit/). `audit.enabled: false` writes a skip
record.
"""
from transfer_learning.audit.report import write_outputs, write_skipped
from transfer_learning.audit.run import audit
from transfer_learning.common.errors import run_main
from transfer_learning.params import load_params


def main() -> None:
    params = load_params().audit
    if not params.enabled:
        write_skipped()
        return
    write_outputs(audit(params), params)


if __name__ == "__main__":
    run_main(main)
