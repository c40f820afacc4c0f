"""fractured: a fracture-detection node for hospital PACS (AI decision support)."""

__version__ = "0.1.0"
