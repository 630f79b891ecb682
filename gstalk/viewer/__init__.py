"""The browser viewer (viser): see app.py."""
