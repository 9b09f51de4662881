"""ebood.train (see ARCHITECTURE in the README)."""
