"""tunesmith: fine-tune language models for a domain, task, style or output format."""

__version__ = "0.1.0"
