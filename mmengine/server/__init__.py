"""Network faces of the Engine: the binary TCP protocol (tcp.py)."""
