"""ebood.report (see ARCHITECTURE in the README)."""
