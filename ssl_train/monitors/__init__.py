"""What a run says about itself: representation health, Prometheus series, and the run's
metrics.jsonl."""
