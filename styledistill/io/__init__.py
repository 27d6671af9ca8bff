"""Storage below every other part: local paths and object-store URLs (uris) with retries for flaky stores
(retry), weights staged once per node (staging), offline model-weight resolution (weights), tars read as
bytes in memory (tars), and a filesystem that injects faults for tests and `chaos` (faultfs). Nothing here
imports the pipeline."""
