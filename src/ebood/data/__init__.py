"""ebood.data (see ARCHITECTURE in the README)."""
