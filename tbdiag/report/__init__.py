"""HTML audit reports of eigenspectra (matplotlib figures in Jinja2 templates, one self-contained file)."""
