"""ebood.models (see ARCHITECTURE in the README)."""
