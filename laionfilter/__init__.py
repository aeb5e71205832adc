"""laionfilter: personalised aesthetic filtering of web-scale image collections by task-vector customisation."""

__version__ = "0.1.0"
