"""Graph rewrites turning stock attention into the dilated ops (issue 4: not built yet)."""
