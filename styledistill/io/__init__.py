"""Storage helpers shared by the pipeline: retries with backoff for flaky object stores."""
