"""Storage below every other part: local paths and object-store URLs (uris), weights staged once per node
(staging), and offline model-weight resolution (weights). Nothing here imports the pipeline."""
