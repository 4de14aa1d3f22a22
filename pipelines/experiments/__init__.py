"""Studies, benchmarks and the demo: above the jobs (they run them), below the scripts. Nothing is imported here."""
