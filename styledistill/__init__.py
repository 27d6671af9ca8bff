"""styledistill: self-distilled training data for content-preserving style transfer."""

__version__ = "0.1.0"
