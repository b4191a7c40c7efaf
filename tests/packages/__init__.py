"""Checks of the SDK and the Node client as users install them (make test-packages)."""
