"""Training, kept apart from the runtime that learns profiles and scores (as open_clip keeps
``open_clip_train``): phase 1 fine-tuning (``finetune``), the databases it reads (``databases``) and
the offline starter-bank builder (``starter``). Nothing under ``laionfilter`` outside this package and
the demo imports it, except ``bank`` when the package ships no starter bank and one must be built.
"""
