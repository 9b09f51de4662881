"""ebood.bench (see ARCHITECTURE in the README)."""
