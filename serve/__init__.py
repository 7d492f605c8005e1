"""Online serving: the fitted workflow and the trained model behind one HTTP API (issue #6)."""
