"""Conversations: data shapes (formats), chat templates, and the loss mask with its fail-closed checks."""
